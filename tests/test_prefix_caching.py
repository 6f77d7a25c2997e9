"""Prefix caching on the real model: the same greedy tokens on and off, only new tokens computed,
cached blocks never written."""

import pytest
import torch

from tokensieve import SamplingParams
from tokensieve.config import KVPolicyConfig, SpeculativeConfig
from tokensieve.engine.prefix_cache import CachedBlock

SYSTEM = "You are a careful assistant for a bakery. Answer briefly and politely. " * 8
QUESTIONS = ["What is 2+2?", "Name a color.", "Say hi to Ann.", "Why is bread soft?"]
GREEDY = SamplingParams(max_tokens=20, temperature=0)


def chats():
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]


def count_computed_tokens(llm) -> list[int]:
    """Wrap the runner so every forward's token count is recorded."""
    counts, run = [], llm.engine.runner.run
    def counting_run(chunks):
        counts.append(sum(c.num_tokens for c in chunks))
        return run(chunks)
    llm.engine.runner.run = counting_run
    return counts


def cached_blocks(engine) -> list[CachedBlock]:
    return list(engine.block_manager.prefix_cache._blocks.values())


def block_contents(engine, blocks: list[CachedBlock]) -> list[torch.Tensor]:
    ids = torch.tensor([b.block_ids.ravel().tolist() for b in blocks]).ravel()
    pool = engine.pool
    return [pool.keys[ids].clone(), pool.values[ids].clone(), pool.positions[ids].clone()]


@pytest.mark.parametrize("speculate", [False, True])
def test_greedy_tokens_are_the_same_with_caching_on_and_off(llm, speculate):
    speculative = SpeculativeConfig(max_nodes=12, tune=False) if speculate else None
    options = dict(kv_cache_bytes=128 * 1024**2, speculative=speculative)
    on, off = llm.with_options(**options), llm.with_options(prefix_caching=False, **options)
    cached, plain = on.generate(chats(), GREEDY), off.generate(chats(), GREEDY)
    assert [o.token_ids for o in cached] == [o.token_ids for o in plain]
    # submitted together, the shared system prompt was computed once: every follower found it cached
    assert cached[0].num_cached_tokens == 0 and all(o.num_cached_tokens >= 112 for o in cached[1:])
    assert on.engine.block_manager.num_used_blocks == 0


def test_a_chats_second_turn_computes_only_its_new_tokens(llm):
    on = llm.with_options(kv_cache_bytes=128 * 1024**2)
    first_turn = chats()[0]
    answer = on.generate(first_turn, GREEDY)[0]
    second_turn = first_turn + [{"role": "assistant", "content": answer.text}, {"role": "user", "content": "And 3+3?"}]
    counts = count_computed_tokens(on)
    reply = on.generate(second_turn, GREEDY)[0]
    prompt = on.encode(second_turn)
    assert reply.num_cached_tokens >= len(on.encode(first_turn)) - 16  # the first turn's blocks, all but a partial one
    new_tokens = len(prompt) - reply.num_cached_tokens
    assert counts[0] == new_tokens < 40  # one prefill forward of the new tokens only, then one per token
    assert sum(counts) == new_tokens + reply.num_generated_tokens - 1
    off = llm.with_options(kv_cache_bytes=128 * 1024**2, prefix_caching=False)
    assert off.generate(second_turn, GREEDY)[0].token_ids == reply.token_ids


def test_cached_blocks_are_never_written_by_the_sequences_sharing_them(llm):
    on = llm.with_options(kv_cache_bytes=128 * 1024**2, speculative=SpeculativeConfig(max_nodes=12, tune=False))
    on.generate(chats()[0], GREEDY)
    blocks = cached_blocks(on.engine)
    before = block_contents(on.engine, blocks)
    # sharers decode speculatively: drafts are written after the shared prefix and moved into place
    outs = on.generate(chats(), SamplingParams(max_tokens=16, temperature=0.8, seed=3))
    assert all(o.num_cached_tokens >= 112 for o in outs)
    after = block_contents(on.engine, blocks)
    assert all(torch.equal(b, a) for b, a in zip(before, after))


def test_a_kv_policy_on_top_stops_sharing_and_changes_nothing(llm, caplog):
    """Under a KV policy that evicts, sequences hold only blocks of their own: compression keeps different
    entries in each (layer, head), so a block never again holds what a key names; the engine says so,
    and shared blocks are never compacted (BlockManager refuses, test_prefix_cache.py)."""
    policy = KVPolicyConfig("streaming_llm", budget=64)
    on = llm.with_options(kv_cache_bytes=128 * 1024**2, kv_policy=policy)
    assert "prefix caching is off: KV policy 'streaming_llm'" in caplog.text
    off = llm.with_options(kv_cache_bytes=128 * 1024**2, kv_policy=policy, prefix_caching=False)
    cached, plain = on.generate(chats()[:2], GREEDY), off.generate(chats()[:2], GREEDY)
    assert [o.token_ids for o in cached] == [o.token_ids for o in plain]
    assert all(o.num_cached_tokens == 0 for o in cached) and on.engine.block_manager.prefix_cache is None
    assert on.engine.compressor.num_compressions > 0 and on.engine.block_manager.num_used_blocks == 0


def test_caching_off_keeps_nothing_and_reports_no_queries(llm):
    off = llm.with_options(kv_cache_bytes=64 * 1024**2, prefix_caching=False)
    off.generate(chats()[:2], GREEDY)
    stats = off.engine.stats()
    assert stats["prefix_cache_queries"] == stats["prefix_cache_hits"] == 0
    assert off.engine.block_manager.num_free_blocks == off.engine.block_manager.num_blocks
