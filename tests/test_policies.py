"""KV policies on hand-made scores and a hand-filled pool: which entries survive, per head, with
ragged lengths, and exact memory accounting. No model needed."""

import numpy as np
import pytest
import torch

from tokensieve.config import KVPolicyConfig
from tokensieve.engine.block_manager import BlockManager
from tokensieve.engine.kv_compression import KVCompressor
from tokensieve.engine.kv_pool import KVPool
from tokensieve.engine.sequence import Sequence
from tokensieve.policies import POLICIES, EntryView, keep_mask, layer_budgets, make_policy
from tokensieve.sampling_params import SamplingParams

INF = float("inf")


def kept_indices(mask: torch.Tensor) -> list:
    return [[row.nonzero().flatten().tolist() for row in layer] for layer in mask]


def test_uniform_budget_keeps_top_scores_per_head_with_ragged_lengths():
    scores = torch.tensor([[[5.0, 1, 4, 2, 3, 9], [0, 8, 7, 6, 0, 0]]])  # head 1 stores 4 entries
    lengths = torch.tensor([[6, 4]])
    mask = keep_mask(scores, lengths, torch.tensor([[3, 3]]), "uniform")
    assert kept_indices(mask) == [[[0, 2, 5], [1, 2, 3]]]
    # a budget above a head's length keeps exactly what is stored, never padding
    mask = keep_mask(scores, lengths, torch.tensor([[10, 10]]), "uniform")
    assert kept_indices(mask) == [[[0, 1, 2, 3, 4, 5], [0, 1, 2, 3]]]


def test_adaptive_budget_moves_entries_to_the_head_that_needs_them():
    # head 0's attention is concentrated on one entry, head 1's is spread over four
    scores = torch.tensor([[[0.9, 0.02, 0.02, 0.02, 0.02], [0.25, 0.25, 0.24, 0.24, 0.02]]])
    lengths = torch.tensor([[5, 5]])
    budgets = torch.tensor([[3, 3]])
    assert kept_indices(keep_mask(scores, lengths, budgets, "uniform")) == [[[0, 1, 2], [0, 1, 2]]]
    mask = keep_mask(scores, lengths, budgets, "adaptive")
    assert mask.sum() == 6  # the layer's total is unchanged
    assert kept_indices(mask) == [[[0, 1], [0, 1, 2, 3]]]


def test_global_budget_ranks_every_layer_and_head_together():
    scores = torch.tensor([[[0.9, 0.8, 0.1], [0.5, 0.0, 0.0]], [[0.7, 0.2, 0.3], [0.6, 0.95, 0.0]]])
    lengths = torch.tensor([[3, 1], [3, 2]])  # padding never counts, whatever its score
    mask = keep_mask(scores, lengths, torch.tensor([[1, 1], [1, 1]]), "global")
    assert kept_indices(mask) == [[[0, 1], []], [[0], [1]]]  # the top 4 of all; one head keeps nothing


def test_pyramid_budgets_shrink_with_depth_and_keep_the_mean():
    budgets = layer_budgets(100, num_layers=5, num_kv_heads=3, allocation="pyramid")
    per_layer = budgets[:, 0].tolist()
    assert per_layer == sorted(per_layer, reverse=True) and per_layer[0] > per_layer[-1]
    assert budgets.float().mean().item() == pytest.approx(100, abs=1)
    assert (budgets == budgets[:, :1]).all()


def view(attention, positions, lengths, budgets):
    return EntryView(
        None if attention is None else torch.tensor(attention, dtype=torch.float32),
        torch.tensor(positions), torch.tensor(lengths), torch.tensor(budgets),
    )


def survivors(policy, entry_view, allocation="uniform"):
    return kept_indices(keep_mask(policy.scores(entry_view), entry_view.lengths, entry_view.budgets, allocation))


def test_streaming_llm_keeps_sinks_and_the_recent_window():
    positions = [[list(range(10)), [0, 1, 2, 3, 5, 8, 9, 0, 0, 0]]]  # head 1 already evicted some
    entry_view = view(None, positions, [[10, 7]], [[6, 6]])
    assert survivors(make_policy("streaming_llm", {"sinks": 2}), entry_view) == [[[0, 1, 6, 7, 8, 9], [0, 1, 3, 4, 5, 6]]]


def test_h2o_keeps_heavy_hitters_and_its_recent_window():
    attention = [[[9.0, 0.1, 5.0, 0.2, 0.3, 0.1, 0.0, 0.0]]]
    entry_view = view(attention, [[list(range(8))]], [[8]], [[4]])
    # recent_ratio 0.5 of a budget of 4: the 2 newest entries, plus the 2 heaviest of the rest
    assert survivors(make_policy("h2o", {"recent_ratio": 0.5}), entry_view) == [[[0, 2, 6, 7]]]


def test_h2o_without_recent_window_is_pure_accumulated_attention():
    attention = [[[9.0, 0.1, 5.0, 0.2, 0.3, 0.1, 0.0, 0.0]]]
    entry_view = view(attention, [[list(range(8))]], [[8]], [[3]])
    assert survivors(make_policy("h2o", {"recent_ratio": 0.0}), entry_view) == [[[0, 2, 4]]]


def test_snapkv_pools_neighbours_and_keeps_its_window():
    attention = [[[0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.0]]]
    entry_view = view(attention, [[list(range(10))]], [[10]], [[5]])
    kept = survivors(make_policy("snapkv", {"window": 2, "kernel": 3}), entry_view)
    assert kept == [[[2, 3, 4, 8, 9]]]  # the peak and its neighbours (pooled), the 2-entry window


def test_tova_keeps_what_the_latest_query_attends_to():
    entry_view = view([[[0.1, 0.5, 0.05, 0.3, 0.05]]], [[list(range(5))]], [[5]], [[2]])
    assert survivors(make_policy("tova"), entry_view) == [[[1, 3]]]


def test_random_keeps_exactly_the_budget():
    entry_view = view(None, [[list(range(50)), list(range(50))]], [[50, 30]], [[10, 10]])
    mask = keep_mask(make_policy("random", seed=3).scores(entry_view), entry_view.lengths, entry_view.budgets, "uniform")
    assert mask.sum(-1).tolist() == [[10, 10]]
    assert not mask[0, 1, 30:].any()


def test_unknown_policy_and_bad_budgets_are_clear_errors():
    with pytest.raises(ValueError, match="unknown KV policy 'lru'.*h2o"):
        KVPolicyConfig("lru", budget=10)
    with pytest.raises(ValueError, match="exactly one of budget or keep_ratio"):
        KVPolicyConfig("h2o")
    with pytest.raises(ValueError, match="bad options for KV policy 'snapkv'"):
        KVPolicyConfig("snapkv", budget=10, options={"windw": 4})
    with pytest.raises(ValueError, match="allocation"):
        KVPolicyConfig("h2o", budget=10, allocation="triangle")
    KVPolicyConfig("full")  # keeps everything: needs no budget
    assert set(POLICIES) >= {"full", "random", "streaming_llm", "h2o", "a2sf", "keyformer", "snapkv", "tova"}


# ---- compaction of a hand-filled pool -----------------------------------------------------------------


def filled_sequence(num_layers=2, num_heads=3, num_tokens=11, block_size=4):
    """A sequence whose pool entries hold their own position in every key/value element."""
    manager = BlockManager(num_blocks=64, block_size=block_size, num_layers=num_layers, num_kv_heads=num_heads)
    pool = KVPool(64, block_size, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))
    seq = Sequence("r", list(range(num_tokens)), SamplingParams(), 0)
    seq.block_table = manager.new_table()
    manager.reserve(seq.block_table, num_tokens)
    slots = torch.from_numpy(seq.block_table.append_slots(num_tokens))  # [layers, tokens, heads]
    positions = torch.arange(num_tokens).view(1, -1, 1).expand_as(slots)
    pool.positions.view(-1)[slots] = positions
    stored = positions.reshape(-1, 1).float().expand(-1, 2)
    pool.store(slots.reshape(-1), stored, stored)
    seq.num_processed = num_tokens
    return seq, pool, manager


def stored_positions(seq, pool, layer, head):
    table = seq.block_table
    entries = range(table.lengths[layer, head])
    slots = [table.blocks[layer, head, e // table.block_size] * table.block_size + e % table.block_size for e in entries]
    keys = pool.entry_major("keys").reshape(-1, 2)[slots][:, 0].long().tolist()
    assert keys == pool.values.view(-1, 2)[slots][:, 1].long().tolist()
    assert keys == pool.positions.view(-1)[slots].tolist()  # keys, values and positions moved together
    return keys


def test_compaction_moves_kept_entries_to_the_front_and_frees_exactly_the_evicted():
    seq, pool, manager = filled_sequence()
    table = seq.block_table
    keep = np.zeros((2, 3, 12), dtype=bool)
    keep[0, 0, [0, 1, 9, 10]] = True  # 4 entries: 1 block
    keep[0, 1, :11] = True  # everything: 3 blocks
    keep[0, 2, [5]] = True
    keep[1, :, [2, 3, 4, 5, 6]] = True  # 5 entries: 2 blocks
    before_entries, before_blocks = manager.num_stored_entries, manager.num_used_blocks
    source, destination = manager.compact(table, keep)
    pool.move(torch.from_numpy(source), torch.from_numpy(destination), table)
    assert manager.num_stored_entries == before_entries - (2 * 3 * 11 - keep.sum())
    assert manager.num_used_blocks == before_blocks - (6 * 3 - (1 + 3 + 1 + 2 * 3))
    assert table.lengths.tolist() == [[4, 11, 1], [5, 5, 5]]
    assert stored_positions(seq, pool, 0, 0) == [0, 1, 9, 10]
    assert stored_positions(seq, pool, 0, 1) == list(range(11))
    assert stored_positions(seq, pool, 0, 2) == [5]
    assert stored_positions(seq, pool, 1, 2) == [2, 3, 4, 5, 6]
    # the freed blocks are really free: the pool can hand them out again
    assert manager.num_free_blocks == 64 - manager.num_used_blocks
    manager.release(table)
    assert manager.num_used_blocks == 0


def test_compressor_evicts_to_budget_and_in_use_bytes_drop_by_the_evicted_entries():
    seq, pool, manager = filled_sequence(num_tokens=11)
    compressor = KVCompressor(KVPolicyConfig("streaming_llm", budget=6, options={"sinks": 2}), pool, manager)
    in_use = manager.num_stored_entries * pool.bytes_per_entry
    compressor.compress(seq)
    assert manager.num_stored_entries * pool.bytes_per_entry == in_use - 2 * 3 * 5 * pool.bytes_per_entry
    for layer in range(2):
        for head in range(3):
            assert stored_positions(seq, pool, layer, head) == [0, 1, 7, 8, 9, 10]
    assert manager.num_used_blocks == 2 * 3 * 2
    # equal lengths, yet each (layer, head) chose its own entries: attention must not share one mask
    assert not seq.block_table.layers_aligned()


def test_recorded_attention_sums_query_heads_of_a_kv_head_and_follows_compaction():
    seq, pool, manager = filled_sequence(num_layers=1, num_heads=2, num_tokens=6)
    compressor = KVCompressor(KVPolicyConfig("h2o", budget=3, options={"recent_ratio": 0.0}), pool, manager)
    # 2 KV heads x 2 query heads x 1 query over 6 entries; logits chosen so softmax is easy to follow
    logits = torch.full((2, 2, 1, 6), float("-inf"))
    logits[0, 0, 0, [1, 4]] = 0.0  # query head 0 of KV head 0: half on entry 1, half on entry 4
    logits[0, 1, 0, [4]] = 0.0  # query head 1 of KV head 0: all on entry 4
    logits[1, :, 0, [0, 2, 3, 5]] = 0.0
    compressor.record(seq, 0, logits, 0, 1)
    assert seq.kv_attention[0][0].tolist() == [0.0, 0.5, 0.0, 0.0, 1.5, 0.0]
    compressor.record(seq, 0, logits, 0, 1)  # accumulates
    assert seq.kv_attention[0][0].tolist() == [0.0, 1.0, 0.0, 0.0, 3.0, 0.0]
    compressor.compress(seq)
    assert stored_positions(seq, pool, 0, 0) == [0, 1, 4]  # ties go to the older entry
    assert seq.kv_attention[0][0].tolist() == [0.0, 1.0, 3.0]  # the record moved with its entries


def test_a2sf_forgets_older_queries_by_its_factor():
    seq, pool, manager = filled_sequence(num_layers=1, num_heads=1, num_tokens=3)
    compressor = KVCompressor(KVPolicyConfig("a2sf", budget=2, options={"forgetting": 0.5}), pool, manager)
    logits = torch.full((1, 1, 2, 3), float("-inf"))
    logits[0, 0, 0, 0] = 0.0  # query 0 -> entry 0
    logits[0, 0, 1, 1] = 0.0  # query 1 -> entry 1
    compressor.record(seq, 0, logits, 0, 2)
    assert seq.kv_attention[0][0].tolist() == [0.5, 1.0, 0.0]
    single = torch.full((1, 1, 1, 3), float("-inf"))
    single[0, 0, 0, 2] = 0.0
    compressor.record(seq, 0, single, 0, 1)  # one more query: the older record halves
    assert seq.kv_attention[0][0].tolist() == [0.25, 0.5, 1.0]
