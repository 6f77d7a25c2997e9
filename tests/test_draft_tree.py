"""Draft trees, drafters, the tree-size choice and path compaction, without a model."""

from __future__ import annotations

import numpy as np
import torch

from tokensieve.config import SpeculativeConfig
from tokensieve.engine.block_table import BlockTable
from tokensieve.engine.sampler import top_tokens
from tokensieve.sampling_params import SamplingParams
from tokensieve.speculative.lookahead import LookaheadDrafter
from tokensieve.speculative.prompt_lookup import PromptLookupDrafter
from tokensieve.speculative.recycling import TokenRecyclingDrafter, static_tree
from tokensieve.speculative.latency import CONTEXTS, STEP, LatencyTable
from tokensieve.speculative.speculator import EXPLORE_EVERY, AcceptanceStats, Speculator
from tokensieve.speculative.tree import DraftTree
from tokensieve.speculative.verify import accept_path


def small_tree() -> DraftTree:
    """root 5 -> {7 -> {8, 9}, 6}; 7 is drafted by both sources (one node), 6 is less likely."""
    tree = DraftTree(5)
    tree.add_chain(0, [7, 8], [("a", 1), ("a", 2)])
    tree.add_chain(0, [7, 9], [("b", 1), ("b", 2)])
    tree.add(0, 6, ("b", 1))
    rates = {("a", 1, True): 0.9, ("b", 1, True): 0.7, ("a", 2, False): 0.8 / 0.9}
    rates |= {("b", 1, False): 0.2, ("b", 2, False): 0.6}
    tree.value(rates.get)
    return tree


def test_siblings_are_deduplicated_and_valued_by_their_best_credited_key():
    tree = small_tree()
    assert tree.tokens == [5, 7, 8, 9, 6]
    assert tree.parents == [-1, 0, 1, 1, 0]
    assert tree.depths == [0, 1, 2, 2, 1]
    assert tree.keys[1] == [("a", 1), ("b", 1)]
    assert tree.credited_keys(1) == [("a", 1, True), ("b", 1, True)] and tree.credited_keys(4) == [("b", 1, False)]
    assert np.allclose(tree.values, [1.0, 0.9, 0.8, 0.9 * 0.6, 0.2])


def test_ancestor_mask_lets_a_node_see_only_its_path():
    mask = small_tree().ancestor_mask()
    assert mask[2].tolist() == [True, True, True, False, False]
    assert mask[3].tolist() == [True, True, False, True, False]
    assert mask[4].tolist() == [True, False, False, False, True]


def test_pruned_keeps_the_likeliest_nodes_with_their_ancestors():
    tree = small_tree()
    assert tree.ranked() == [1, 2, 3, 4]
    pruned = tree.pruned(2)
    assert pruned.tokens == [5, 7, 8] and pruned.parents == [-1, 0, 1]
    assert pruned.keys[1] == [("a", 1), ("b", 1)]


def test_greedy_walk_descends_while_the_argmax_is_a_child():
    tree = small_tree()
    logits = torch.zeros(5, 12)
    logits[0, 7] = logits[1, 9] = logits[3, 11] = 1.0  # root -> 7 -> 9 -> 11 (not drafted)
    path, emitted = accept_path(tree, logits, SamplingParams(temperature=0), [1, 2, 5])
    assert path == [0, 1, 3] and emitted == [7, 9, 11]


def test_greedy_walk_applies_the_repetition_penalty_along_the_path():
    tree = small_tree()
    logits = torch.zeros(5, 12)
    logits[0, 7] = 2.0
    logits[1, 7], logits[1, 8] = 1.5, 1.0  # 7 was just emitted: penalised below 8
    path, emitted = accept_path(tree, logits, SamplingParams(temperature=0, repetition_penalty=2.0), [1])
    assert emitted[:2] == [7, 8] and path[:3] == [0, 1, 2]


def test_sampled_walk_draws_what_plain_sampling_draws_with_the_same_seed():
    """Each emitted token is the draw plain sampling makes at its position, in order."""
    tree = small_tree()
    logits = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.7, top_k=6)
    from tokensieve.engine.sampler import draw_token

    for seed in range(20):
        path, emitted = accept_path(tree, logits, params, [1], seed)
        node, expected = 0, []
        for _ in emitted:
            expected.append(draw_token(logits[node], params, [1] + expected, seed))
            node = tree.children(node).get(expected[-1], -1)
        assert emitted == expected and len(path) == len(emitted)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    tree = DraftTree(3)
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 6, 7, 2, 3]
    PromptLookupDrafter(max_ngram=2).propose({}, tokens, tree, 3)
    # "2 3" occurred twice before the end: latest first (6 7 2), then (4 5 9)
    assert [tree.tokens[n] for n in tree.path(3)] == [3, 6, 7, 2]
    assert [tree.tokens[n] for n in tree.path(6)] == [3, 4, 5, 9]
    assert tree.keys[1] == [("lookup", 2, 1)]


def test_token_recycling_fills_its_static_tree_from_learned_successors():
    slots = static_tree(10, 3, 4)
    assert len(slots) == 10 and all(parent < index + 1 for index, (parent, _) in enumerate(slots))
    drafter = TokenRecyclingDrafter(vocab_size=20, top_k=4, num_nodes=10, max_depth=3)
    logits = torch.zeros(2, 20)
    logits[0, [11, 12, 13, 14]] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # after token 5
    logits[1, [15, 16, 17, 18]] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # after token 11
    drafter.learn([5, 11], top_tokens(logits, 4).numpy())
    tree = DraftTree(5)
    drafter.propose({}, [5], tree, 3)
    assert sorted(tree.children(0)) == [11, 12, 13, 14]
    assert sorted(tree.children(tree.children(0)[11])) == [15, 16, 17, 18][: len(tree.children(tree.children(0)[11]))]
    assert all(tree.tokens[n] != 0 for n in range(1, len(tree)))  # unknown tokens (12..18) have no children


def test_lookahead_layout_is_a_set_of_jacobi_columns():
    drafter = LookaheadDrafter(ngram=3, width=3)
    assert drafter.offsets.tolist() == [1, 2, 3, 2, 3, 4]
    # level 1, column 2 sees level-0 columns 0, 1 and its own column's level 0
    assert drafter.mask[5].tolist() == [True, True, True, False, False, True]
    assert drafter.mask[1].tolist() == [True, True, False, False, False, False]


def test_lookahead_pool_collects_column_ngrams_and_the_window_moves_up():
    drafter = LookaheadDrafter(ngram=3, width=2)
    state = {"window": np.array([[4, 5], [6, 7]]), "pool": {}}
    drafter.learn(state, np.array([0, 0, 8, 9]))  # the greedy token after each row (the top level's count)
    assert list(state["pool"][4]) == [(6, 8)] and list(state["pool"][5]) == [(7, 9)]
    assert state["window"].tolist() == [[6, 7], [8, 9]]
    tree = DraftTree(4)
    drafter.propose(state, [1, 4], tree, 4)
    assert tree.tokens == [4, 6, 8]


def test_acceptance_stats_credit_only_nodes_whose_parent_was_accepted():
    tree = small_tree()
    stats = AcceptanceStats()
    stats.update(tree, [0, 1], streak=2)  # 7 (both sources) accepted, then neither 8 nor 9
    assert stats.tried[("a", 1, True, 2)] == 1 and stats.accepted[("a", 1, True, 2)] == 1
    assert stats.tried[("b", 1, True, 2)] == 1 and stats.accepted[("b", 1, True, 2)] == 1
    assert stats.tried[("b", 1, False, 2)] == 1 and stats.accepted[("b", 1, False, 2)] == 0  # node 6, "b" alone
    assert stats.tried[("a", 2, False, 2)] == 1 and stats.accepted[("a", 2, False, 2)] == 0
    assert stats.rate(("a", 1, True), 2) == (1 + 2 * 0.5) / 3 and stats.rate(("a", 1, True), 0) == 0.5


def test_a_sequence_s_acceptance_rates_start_from_the_shared_ones_and_follow_its_own():
    shared = AcceptanceStats()
    for _ in range(20):
        shared.update(small_tree(), [0, 1], streak=0)  # across requests, node 1 ("a" at depth 1) is accepted
    own = AcceptanceStats(shared=shared)
    assert own.rate(("a", 1, True), 0) == shared.rate(("a", 1, True), 0) > 0.9
    for _ in range(20):
        own.update(small_tree(), [0], streak=0)  # this request accepts nothing
    assert own.rate(("a", 1, True), 0) < 0.3 and shared.rate(("a", 1, True), 0) > 0.9


def test_a_source_is_rated_apart_when_another_source_proposed_the_same_token():
    """Over many steps "b" alone is wrong and "b" agreeing with "a" is right: a node "b" proposes
    alone ends up valued low, one both propose high, though "b" used one (depth) key for both."""
    stats = AcceptanceStats()
    for _ in range(30):
        stats.update(small_tree(), [0, 1], streak=0)  # 7 (a and b) accepted, 6 (b alone) not
    tree = small_tree()
    tree.value(lambda key: stats.rate(key, 0))
    assert tree.values[1] > 0.9 and tree.values[4] < 0.1


class FakeLatency:
    def __init__(self, per_token: float):
        self.per_token = per_token

    def seconds(self, batch, drafted, context):
        return 1.0 + self.per_token * (batch - 1 + np.asarray(drafted, dtype=float))


def _speculator(per_token: float) -> Speculator:
    return Speculator(SpeculativeConfig(drafters=("lookup",), max_nodes=8), 50, FakeLatency(per_token), 1000)


def test_tree_size_maximises_expected_tokens_per_second():
    tree = DraftTree(1)
    rates = [0.9, 0.8 / 0.9, 0.3 / 0.8, 0.1 / 0.3]
    tree.add_chain(0, [2, 3, 4, 5], [("a", depth) for depth in range(4)])
    tree.value(lambda key: rates[key[1]])
    # cheap tokens (0.1 s each): keep nodes while value / cost beats the running rate
    assert _speculator(0.1)._tree_sizes([tree], 1, 100.0) == [3]
    # expensive tokens: speculation does not pay, fall back to plain decoding...
    speculator = _speculator(2.0)
    speculator.num_forwards = 1
    assert speculator._tree_sizes([tree], 1, 100.0) == [0]
    # ...except every EXPLORE_EVERY forwards, when the best node still runs (to keep measuring)
    speculator.num_forwards = EXPLORE_EVERY
    assert speculator._tree_sizes([tree], 1, 100.0) == [1]


def _probe(batch, grid, context):
    """A forward: 1 s, plus 0.1 s per drafted token, plus 1 ms per stored token per query row."""
    return [1.0 + 0.1 * d + 0.001 * context * (1 + d) for d in grid]


def test_latency_table_follows_real_forwards():
    """A plain step shifts the whole curve; a drafted one moves only the grid points around it."""
    table = LatencyTable(_probe, lambda batch: 8, None)
    short = CONTEXTS[0]
    before = table.seconds(1, np.arange(9), short)
    table.observe(1, 0, short, 2.0)  # a plain step slower than the table says
    assert np.allclose(table.seconds(1, np.arange(9), short), before + STEP * before[0])
    shifted = table.seconds(1, np.arange(9), short)
    table.observe(1, 5, short, 10.0)  # between grid points 4 and 6: both move, the ones before stay
    after = table.seconds(1, np.arange(9), short)
    assert after[4] > shifted[4] and after[6] > shifted[6] and after[3] == shifted[3]
    for _ in range(200):
        table.observe(1, 1, short, 0.5)  # one drafted token turns out cheap: its point falls below its neighbour's
    assert (np.diff(table.seconds(1, np.arange(9), short)) >= 0).all()  # but latency never falls as tokens are added
    assert table.seconds(1, [1], short)[0] == table.seconds(1, [0], short)[0]


def test_latency_table_prices_drafts_by_context():
    """Between the probed contexts the table interpolates, beyond the longest it extrapolates, below
    the shortest it keeps the shortest's; steps observed on long prompts leave short ones' prices."""
    table = LatencyTable(_probe, lambda batch: 8, None)
    for context in (CONTEXTS[0], (CONTEXTS[0] + CONTEXTS[1]) / 2, CONTEXTS[1], 2 * CONTEXTS[1]):
        assert np.allclose(table.seconds(1, [0, 4], context), _probe(1, [0, 4], context))
    assert np.allclose(table.seconds(1, [4], 10), _probe(1, [4], CONTEXTS[0]))
    short_before = table.seconds(1, np.arange(9), CONTEXTS[0])
    for _ in range(100):  # drafts on a long prompt turn out dearer than probed
        table.observe(1, 4, 2 * CONTEXTS[1], 2 * _probe(1, [4], 2 * CONTEXTS[1])[0])
    assert np.array_equal(table.seconds(1, np.arange(9), CONTEXTS[0]), short_before)
    assert table.seconds(1, [4], CONTEXTS[1])[0] > 1.5 * _probe(1, [4], CONTEXTS[1])[0]


def test_latency_table_tracks_the_median_forward_not_the_stalls():
    """On a shared machine one step in five stalls (5x); the table settles at the typical step,
    where a running mean would settle at 1.8x it."""
    table = LatencyTable(_probe, lambda batch: 8, None)
    rng = np.random.default_rng(0)
    typical = _probe(1, [4], 500)[0] * 1.4
    assert table.seconds(1, [4], 500)[0] < 0.75 * typical  # measures the probe
    for _ in range(2000):
        table.observe(1, 4, 500, typical * (5.0 if rng.random() < 0.2 else rng.uniform(0.95, 1.05)))
    assert abs(table.seconds(1, [4], 500)[0] - typical) < 0.1 * typical


def test_keep_appended_moves_the_accepted_path_behind_the_prefix_and_frees_the_rest():
    table = BlockTable(num_layers=1, num_kv_heads=2, block_size=4)
    table.add_blocks(np.array([[3, 3]]), [10, 11, 12, 20, 21, 22])
    table.append_slots(3)  # prefix
    table.append_slots(6)  # root + 5 drafted nodes
    source, destination, freed = table.keep_appended(6, np.array([0, 2, 5]))
    assert table.lengths.tolist() == [[6, 6]] and table.num_blocks.tolist() == [[2, 2]]
    assert sorted(freed) == [12, 22]
    # head 0: entries 3+2=5 -> 4 and 3+5=8 -> 5; entry i lives in block i // 4 at offset i % 4
    assert source[:2].tolist() == [11 * 4 + 1, 12 * 4 + 0] and destination[:2].tolist() == [11 * 4 + 0, 11 * 4 + 1]
    assert not table.compacted


def test_a_gpu_lets_the_tuner_keep_big_trees():
    """Where a drafted token costs next to nothing the tuner keeps every node worth anything, up to the
    device's cap: 96 on a GPU, 32 on a CPU."""
    assert SpeculativeConfig().on_device("cpu").max_nodes == 32
    gpu = SpeculativeConfig(drafters=("lookup",)).on_device("cuda")
    assert (gpu.max_nodes, gpu.recycling_slots) == (96, 80)
    assert SpeculativeConfig(max_nodes=7).on_device("cuda").max_nodes == 7  # what a user sets stays
    tree = DraftTree(1)
    for branch in range(60):  # 60 chains of 3: 180 drafted nodes, each worth something
        tree.add_chain(0, [100 + 3 * branch, 101 + 3 * branch, 102 + 3 * branch], [("a", depth) for depth in range(3)])
    tree.value(lambda key: 0.5)
    speculator = Speculator(gpu, 500, FakeLatency(1e-4), 1000)
    assert speculator._tree_sizes([tree], 1, 100.0) == [96]
