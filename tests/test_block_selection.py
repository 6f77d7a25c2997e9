"""Selection instead of eviction (Quest): the block bounds are bounds, the chosen blocks are the best
ones plus the first and last, a budget covering every block is exactly full attention, and the engine
reports what decoding read."""

import pytest
import torch

from conftest import assert_pool_empty
from tokensieve import KVSelectionConfig, SamplingParams
from tokensieve.engine.attention import PagedAttention
from tokensieve.engine.block_selection import block_bounds, select_blocks, shortlist_scores, shortlisted
from tokensieve.engine.kv_pool import KVPool
from tokensieve.engine.selection_cache import Choice, SelectionCache
from tokensieve.config import EngineConfig
from tokensieve.errors import ConfigError
from tokensieve.kernels import native_kernels

BLOCK = 4


@pytest.fixture(scope="module")
def pytorch_llm():
    """The engine without native kernels: decoding gathers the selected blocks and runs SDPA."""
    from tokensieve import LLM

    return LLM("smollm2-135m", native_kernels=False)


def test_a_blocks_bound_is_at_least_every_score_of_its_keys():
    torch.manual_seed(0)
    keys = torch.randn(2, 3, 5, BLOCK, 8)  # [seqs, kv_heads, blocks, entries, dim]
    q = torch.randn(2, 3, 2, 8)  # two query heads per KV head
    bounds = block_bounds(q, keys.amin(3), keys.amax(3))
    scores = torch.einsum("skgd,skbed->skgbe", q, keys).amax(-1).amax(2)  # best key of each block, best head
    assert (bounds >= scores - 1e-5).all()


def test_selection_keeps_the_best_blocks_and_the_first_and_last_in_order():
    tables = torch.tensor([[[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 0, 0]]])  # head 1 holds 4 blocks
    lengths = torch.tensor([[22, 14]])  # the last block of head 0 holds 2 entries, of head 1 2
    bounds = torch.tensor([[[0.0, 5, 1, 9, 2, 0], [0, 0, 7, 3, 99, 99]]])
    selected, new_lengths, places = select_blocks(bounds, tables, lengths, torch.tensor([[3, 3]]), BLOCK)
    assert selected[0, 0].tolist() == [10, 13, 15]  # first, the best (9), last
    assert places[0].tolist() == [[0, 3, 5], [0, 2, 3]]
    assert selected[0, 1].tolist() == [20, 22, 23]  # padding blocks never count, whatever their bound
    assert new_lengths.tolist() == [[2 * BLOCK + 2, 2 * BLOCK + 2]]
    # a budget of one block is the newest: the query's own entry is there
    selected, new_lengths, _ = select_blocks(bounds, tables, lengths, torch.tensor([[1, 1]]), BLOCK)
    assert selected[0, :, 0].tolist() == [15, 23] and new_lengths.tolist() == [[2, 2]]
    # a budget covering every block attends to the whole head, as full attention does
    selected, new_lengths, _ = select_blocks(bounds, tables, lengths, torch.tensor([[6, 9]]), BLOCK)
    assert selected[0, 0].tolist() == tables[0, 0].tolist() and selected[0, 1, :4].tolist() == [20, 21, 22, 23]
    assert new_lengths.tolist() == lengths.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_pool_keeps_each_blocks_key_bounds_through_reuse_and_moves(dtype):
    torch.manual_seed(0)
    pool = KVPool(8, BLOCK, 6, dtype, torch.device("cpu"), key_bounds=True)
    keys = torch.randn(20, 1, 6)
    pool.store(torch.arange(10), keys[:10], keys[:10])  # blocks 0, 1 full, block 2 half
    pool.store(torch.arange(10, 12), keys[10:12], keys[10:12])
    pool.store(torch.arange(4), keys[12:16], keys[12:16])  # block 0 reused: its old keys no longer count
    stored = torch.cat([keys[12:16], keys[4:12]])[:, 0].to(dtype)
    for block in range(3):
        assert torch.equal(pool.key_min[block], stored[block * BLOCK : (block + 1) * BLOCK].amin(0))
        assert torch.equal(pool.key_max[block], stored[block * BLOCK : (block + 1) * BLOCK].amax(0))
    pool.move(torch.tensor([1]), torch.tensor([13]), None)  # into block 3: its bounds cover what moved in
    assert torch.equal(pool.key_min[3], torch.minimum(pool.key_min[3], stored[1])) and (pool.key_max[3] >= stored[1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block, shortlist", [(BLOCK, 0), (BLOCK, 3), (16, 2)])
def test_the_kernels_bound_and_select_as_the_pytorch_rule_does(dtype, block, shortlist):
    kernels = native_kernels()
    torch.manual_seed(0)
    seqs, kv_heads, group, dim, width = 3, 2, 3, 16, 12
    native = KVPool(80, block, dim, dtype, torch.device("cpu"), kernels, key_bounds=True)
    reference = KVPool(80, block, dim, dtype, torch.device("cpu"), key_bounds=True)
    tables = torch.randperm(80)[: seqs * kv_heads * width].view(seqs, kv_heads, width)
    lengths = torch.randint(1, width * block + 1, (seqs, kv_heads))
    for pool in (native, reference):  # each (sequence, head) fills its blocks in two writes, the first partial
        for first, last in ((0, 5), (5, width * block)):
            entries = torch.arange(first, last)
            slots = (tables[..., entries // block] * block + entries % block).reshape(-1, 1)
            keys = torch.randn(len(slots), 1, dim, generator=torch.Generator().manual_seed(first))
            pool.store(slots, keys, keys)
    assert torch.equal(native.key_min, reference.key_min) and torch.equal(native.key_max, reference.key_max)
    q = torch.randn(seqs, kv_heads * group, dim)
    for budget in (1, 2, 3, 5, width):
        budgets = torch.full((seqs, kv_heads), budget)
        selected, new_lengths, places = kernels.select_blocks(
            q, native.key_min, native.key_max, tables, lengths, budgets, block, native.keys, shortlist
        )
        grouped = q.view(seqs, kv_heads, group, dim)
        bounds = block_bounds(grouped, reference.key_min[tables], reference.key_max[tables])
        if shortlist:
            listed = shortlisted(bounds, lengths, budgets, block, shortlist)
            keys = reference.read_blocks("keys", tables.flatten()).view(seqs, kv_heads, width, block, dim)
            bounds = shortlist_scores(grouped, keys, listed)
        expected, expected_lengths, expected_places = select_blocks(bounds, tables, lengths, budgets, block)
        assert torch.equal(new_lengths, expected_lengths)
        for s in range(seqs):
            for h in range(kv_heads):
                used = -(-int(new_lengths[s, h]) // block)
                assert selected[s, h, :used].tolist() == expected[s, h, :used].tolist()
                assert places[s, h, :used].tolist() == expected_places[s, h, :used].tolist()


def test_a_shortlist_picks_the_block_whose_best_key_scores_highest_not_the_loosest_bound():
    """Block 1's keys spread wide, so its bound (10) beats block 2's (6), though none of its keys scores above 0;
    the shortlist's exact scores choose block 2."""
    kernels = native_kernels()
    dim, q = 2, torch.tensor([[[1.0, 1.0]]])
    pool = KVPool(8, BLOCK, dim, torch.float32, torch.device("cpu"), kernels, key_bounds=True)
    keys = torch.tensor([[0.0, 0.0]] * BLOCK + [[5.0, -5.0], [-5.0, 5.0]] * 2 + [[3.0, 3.0]] * BLOCK + [[0.5, 0.5]] * BLOCK
                        + [[0.0, 0.0]])
    pool.store(torch.arange(len(keys)), keys.unsqueeze(1), keys.unsqueeze(1))
    tables, lengths, budget = torch.tensor([[[0, 1, 2, 3, 4]]]), torch.tensor([[len(keys)]]), torch.tensor([[3]])
    for shortlist, expected in ((0, [0, 1, 4]), (2, [0, 2, 4])):
        selected, _, _ = kernels.select_blocks(q, pool.key_min, pool.key_max, tables, lengths, budget, BLOCK, pool.keys, shortlist)
        assert selected[0, 0].tolist() == expected
        bounds = block_bounds(q.view(1, 1, 1, dim), pool.key_min[tables], pool.key_max[tables])
        if shortlist:
            listed = shortlisted(bounds, lengths, budget, BLOCK, shortlist)
            bounds = shortlist_scores(q.view(1, 1, 1, dim), pool.read_blocks("keys", tables.flatten()).view(1, 1, 5, BLOCK, dim), listed)
        assert select_blocks(bounds, tables, lengths, budget, BLOCK)[0][0, 0].tolist() == expected


def test_selection_settings_are_checked():
    with pytest.raises(ConfigError, match="exactly one of budget"):
        KVSelectionConfig()
    with pytest.raises(ConfigError, match="ratio"):
        KVSelectionConfig(ratio=1.5)
    with pytest.raises(ConfigError, match="selection_layers must start"):
        KVSelectionConfig(ratio=0.5, selection_layers=(5, 9))
    with pytest.raises(ConfigError, match="shortlist"):
        KVSelectionConfig(ratio=0.5, shortlist=1)
    with pytest.raises(ConfigError, match="float kv_dtype"):
        EngineConfig(kv_dtype="int8", kv_selection=KVSelectionConfig(ratio=0.5, shortlist=2))


@pytest.mark.parametrize("engine", ["llm", "pytorch_llm"])
def test_a_budget_covering_every_block_decodes_exactly_as_full_attention(engine, request):
    llm = request.getfixturevalue(engine)
    prompt = {"prompt_token_ids": llm.encode("The harbour town kept its old lighthouse. " * 40)}
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = llm.generate(prompt, params)[0].token_ids
    selecting = llm.with_options(kv_selection=KVSelectionConfig(budget=4096, dense_layers=0))
    assert selecting.generate(prompt, params)[0].token_ids == expected
    stats = selecting.engine.stats()
    assert stats["selected_decode_entries"] == stats["stored_decode_entries"] > 0


def test_selection_layers_choose_and_the_layers_after_them_attend_at_the_same_places(llm, monkeypatch):
    """TidalDecode: with a budget covering every block it is still full attention; with a small one, every
    layer after a selection layer attends to the blocks at the places that layer chose."""
    prompt = {"prompt_token_ids": llm.encode("The harbour town kept its old lighthouse. " * 60)}
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    expected = llm.generate(prompt, params)[0].token_ids
    covering = KVSelectionConfig(budget=4096, selection_layers=(2, 16))
    assert llm.with_options(kv_selection=covering).generate(prompt, params)[0].token_ids == expected
    chosen, held = [], []  # (layer, places of the attended blocks in its table), blocks held: first decode step
    decode_blocks = PagedAttention._decode_blocks

    def recording(self, layer, q):
        tables, lengths = decode_blocks(self, layer, q)
        if self.selection is not None and layer >= 2 and len(chosen) < llm.engine.model.config.num_layers - 2:
            place = {int(block): i for i, block in enumerate(self.decode.block_tables[layer][0, 0].tolist())}
            used = -(-int(lengths[0, 0]) // llm.engine.config.block_size)
            chosen.append((layer, [place[int(block)] for block in tables[0, 0, :used].tolist()]))
            held.append(-(-int(self.decode.lengths[layer][0, 0]) // llm.engine.config.block_size))
        return tables, lengths

    monkeypatch.setattr(PagedAttention, "_decode_blocks", recording)
    llm.with_options(kv_selection=KVSelectionConfig(ratio=0.125, selection_layers=(2, 16))).generate(prompt, params)
    places = dict(chosen)
    assert all(len(picked) < blocks // 4 for (_, picked), blocks in zip(chosen, held))  # a real selection
    assert all(places[layer] == places[2 if layer < 16 else 16] for layer in places)


def test_a_small_budget_reads_a_fraction_of_the_entries_and_frees_everything(llm):
    selecting = llm.with_options(kv_selection=KVSelectionConfig(ratio=0.125), kv_cache_bytes=256 * 1024**2)
    prompt = {"prompt_token_ids": llm.encode("The harbour town kept its old lighthouse. " * 120)}
    out = selecting.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 8
    stats = selecting.engine.stats()
    share = stats["selected_decode_entries"] / stats["stored_decode_entries"]
    assert 0.11 <= share < 0.2  # an eighth in whole blocks (the last one partly filled)
    pool = selecting.engine.pool  # the bounds are allocated memory too, and reported as such
    assert pool.bytes_per_block == llm.engine.pool.bytes_per_block + 2 * pool.head_dim * pool.keys.element_size()
    assert_pool_empty(selecting)


def test_a_choice_is_reusable_only_for_a_similar_query_over_the_same_blocks():
    query = torch.randn(3, 3, 64)
    cache = SelectionCache()
    cache.choices[5] = Choice(query, torch.tensor([[0, 2, 3]] * 3), torch.tensor([40] * 3), torch.tensor([60] * 3),
                              torch.tensor([3] * 3), version=7)
    budget = torch.tensor([3] * 3)
    assert cache.reusable(5, query + 0.01 * torch.randn(3, 3, 64), budget, 7, 0.9) is cache.choices[5]
    assert cache.reusable(5, -query, budget, 7, 0.9) is None  # the query turned away
    assert cache.reusable(5, query, budget, 8, 0.9) is None  # a block was added, dropped or moved since
    assert cache.reusable(5, query, budget + 1, 7, 0.9) is None  # the budget grew
    assert cache.reusable(4, query, budget, 7, 0.9) is None  # another layer never chose


def test_reusing_choices_while_queries_stay_similar_skips_choosing_and_covers_all_blocks_exactly(llm):
    prompt = {"prompt_token_ids": llm.encode("The harbour town kept its old lighthouse. " * 60)}
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    always = llm.with_options(kv_selection=KVSelectionConfig(ratio=0.125, reuse_above=-1.0))
    out = always.generate(prompt, params)[0]
    stats = always.engine.stats()
    selecting_layers = 30 - 2
    # reuse whenever the blocks are unchanged: choosing again only after a block is added (every 16 steps)
    assert selecting_layers * 18 <= stats["reused_block_choices"] <= selecting_layers * 22 and len(out.token_ids) == 24
    every_block = llm.with_options(kv_selection=KVSelectionConfig(ratio=1.0, reuse_above=-1.0))
    assert every_block.generate(prompt, params)[0].token_ids == llm.generate(prompt, params)[0].token_ids
    assert_pool_empty(always)
