"""Prefix caching's bookkeeping with plain sequences and no model: keys, ref counts, LRU, grouping."""

import numpy as np
import pytest

from tokensieve.engine.block_manager import BlockManager
from tokensieve.engine.prefix_cache import extend_block_keys
from tokensieve.engine.scheduler import Scheduler
from tokensieve.engine.sequence import Sequence
from tokensieve.sampling_params import SamplingParams

BLOCK = 4
GROUP = 2  # physical blocks per logical block: 2 layers x 1 KV head


def make_scheduler(num_blocks=200, max_num_seqs=8):
    manager = BlockManager(num_blocks, block_size=BLOCK, num_layers=2, num_kv_heads=1, prefix_caching=True)
    return Scheduler(manager, max_num_seqs, max_batched_tokens=64, prefill_chunk_size=64)


def caching_seq(i, token_ids, client="default"):
    seq = Sequence(f"r{i}", list(token_ids), SamplingParams(), arrival_order=i, client=client)
    seq.shares_prefix = True
    return seq


def computed(scheduler, i, token_ids):
    """A caching sequence added and run for one step (its prompt computed, its full blocks cached)."""
    seq = caching_seq(i, token_ids)
    scheduler.add(seq)
    run(scheduler)
    return seq


def run(scheduler, steps=1):
    """What the engine does after a forward: count processed tokens, cache full blocks, append a token."""
    for _ in range(steps):
        for chunk in scheduler.schedule().chunks:
            seq = chunk.seq
            completes = chunk.completes_sequence
            seq.block_table.append_slots(chunk.num_tokens)
            seq.num_processed += chunk.num_tokens
            scheduler.cache_computed(seq)
            if completes:
                seq.append_token(1000 + seq.num_output_tokens)


def block_keys(token_ids, known=()):
    keys = list(known)
    extend_block_keys(keys, token_ids, BLOCK)
    return keys


def test_block_keys_chain_the_whole_prefix():
    a, b = block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9]), block_keys([9, 2, 3, 4, 5, 6, 7, 8])
    assert len(a) == 2 and len(b) == 2  # only full blocks have keys
    assert a[0] != b[0] and a[1] != b[1]  # the same second block behind another first block is another key
    assert block_keys([1, 2, 3, 4, 5, 6, 7, 8], known=a[:1]) == a


def test_a_block_computed_twice_is_kept_once():
    scheduler = make_scheduler()
    manager = scheduler.block_manager
    a, b = caching_seq(0, range(10)), caching_seq(1, range(10))
    b.shares_prefix = False  # b computes the same blocks privately, as if admitted in the same step
    for seq in (a, b):
        scheduler.add(seq)
    run(scheduler)
    used = manager.num_used_blocks
    b.shares_prefix = True
    scheduler.cache_computed(b)  # b's copies of a's cached blocks go back; b holds a's
    assert b.block_table.cached == a.block_table.cached and [blk.refs for blk in a.block_table.cached] == [2, 2]
    assert (b.block_table.blocks[:, :, :2] == a.block_table.blocks[:, :, :2]).all()
    assert manager.num_used_blocks == used - 2 * GROUP


def test_a_second_request_starts_from_the_cached_prefix_and_computes_at_least_one_token():
    scheduler = make_scheduler()
    manager = scheduler.block_manager
    first = computed(scheduler, 0, range(12))
    assert len(first.block_table.cached) == 3  # 12 computed tokens: three full blocks cached
    second = caching_seq(1, range(12))  # identical prompt: the last token is computed again
    scheduler.add(second)
    out = scheduler.schedule()
    chunk = next(c for c in out.chunks if c.seq is second)
    assert second.num_cached_tokens == 8 and chunk.num_tokens == 4
    assert (second.block_table.blocks[:, :, :2] == first.block_table.blocks[:, :, :2]).all()
    assert manager.prefix_cache.num_queried_tokens == 24 and manager.prefix_cache.num_hit_tokens == 8


def test_freed_blocks_stay_cached_until_the_pool_needs_them_deepest_first():
    scheduler = make_scheduler(num_blocks=8 * GROUP)
    manager = scheduler.block_manager
    first = computed(scheduler, 0, range(16))
    scheduler.remove(first)
    assert manager.num_used_blocks == 0 and manager.prefix_cache.num_evictable == 4
    # a stranger needs 5 blocks of the 8: the 4 free ones, then the deepest cached block goes
    stranger = computed(scheduler, 1, range(100, 120))
    assert manager.prefix_cache.num_evictable == 3
    scheduler.remove(stranger)
    again = caching_seq(2, list(range(16)) + [99])
    scheduler.add(again)
    scheduler.schedule()
    assert again.num_cached_tokens == 12  # the first three blocks survived


def test_shared_blocks_are_reference_counted():
    scheduler = make_scheduler()
    manager = scheduler.block_manager
    a = computed(scheduler, 0, range(9))
    b = computed(scheduler, 1, range(9))
    shared = a.block_table.cached
    assert [block.refs for block in shared] == [2, 2]
    used = manager.num_used_blocks
    scheduler.remove(a)
    assert [block.refs for block in shared] == [1, 1]
    assert manager.num_used_blocks == used - GROUP  # only a's own last block came back
    scheduler.remove(b)
    assert manager.num_used_blocks == 0 and manager.prefix_cache.num_evictable == 2


def test_a_batch_sharing_a_prefix_computes_it_once():
    scheduler = make_scheduler()
    system = list(range(40))
    seqs = [caching_seq(i, system + [100 + i, 200 + i]) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    out = scheduler.schedule()
    assert [c.seq for c in out.chunks] == [seqs[0]]  # the others wait for the leader's blocks
    for chunk in out.chunks:
        chunk.seq.block_table.append_slots(chunk.num_tokens)
        chunk.seq.num_processed += chunk.num_tokens
        scheduler.cache_computed(chunk.seq)
        chunk.seq.append_token(7)
    out = scheduler.schedule()
    followers = [c for c in out.chunks if c.seq is not seqs[0]]
    assert [c.num_tokens for c in followers] == [2, 2, 2]  # 40 cached tokens each, the last 2 computed
    assert all(s.num_cached_tokens == 40 for s in seqs[1:])


def test_a_preempted_sequence_resumes_from_its_cached_blocks():
    scheduler = make_scheduler(num_blocks=12 * GROUP, max_num_seqs=2)
    old, new = caching_seq(0, range(20)), caching_seq(1, range(100, 120))
    for seq in (old, new):
        scheduler.add(seq)
        run(scheduler)
    for _ in range(10):  # both decode until the pool runs short and the newest is preempted
        run(scheduler)
        if scheduler.num_preemptions:
            break
    assert new.num_preemptions == 1 and new.num_processed == 0
    scheduler.remove(old)
    scheduler.schedule()
    # it starts again from its cached full blocks (prompt and generated tokens), not from nothing
    assert new.num_processed >= 16 and new.num_processed % BLOCK == 0
    assert new.num_cached_tokens == 0  # counted at its first admission, when nothing was cached


def test_a_table_sharing_cached_blocks_is_never_compacted():
    scheduler = make_scheduler()
    a = computed(scheduler, 0, range(9))
    keep = np.ones((2, 1, 12), dtype=bool)
    with pytest.raises(AssertionError, match="never compresses"):
        scheduler.block_manager.compact(a.block_table, keep)
