"""Paged decode attention: the plain-PyTorch version and the Triton kernels (through Triton's interpreter
on the CPU) against a naive per-head softmax, and the PyTorch version without host syncs."""

from __future__ import annotations

import pytest
import torch
from conftest import no_host_sync, triton_modules

from tokensieve.engine.paged_decode import paged_decode_attention, paged_decode_attention_torch

BLOCK = 16
MAX_BLOCKS = 5
# lengths per (seq, KV head), cycled: one entry, exact block multiples, partial blocks, the whole table
LENGTHS = [1, 16, 37, 80, 5, 32, 17, 64, 49]


def make_case(seqs, kv_heads, group, dim, pool_dtype, q_dtype=torch.float32, seed=0):
    """One query per sequence over a pool (see make_pool)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([LENGTHS[(i + seed) % len(LENGTHS)] for i in range(seqs * kv_heads)]).view(seqs, kv_heads)
    keys, values, block_tables = make_pool(lengths, dim, pool_dtype, generator)
    q = torch.randn(seqs, kv_heads * group, dim, generator=generator).to(q_dtype)
    return q, keys, values, block_tables, lengths


def make_pool(lengths, dim, pool_dtype, generator, max_blocks=MAX_BLOCKS):
    """keys, values and block tables: each (seq, KV head)'s blocks scattered in a pool, its table padded with
    block 0."""
    seqs, kv_heads = lengths.shape
    num_blocks = seqs * kv_heads * max_blocks + 1
    keys = torch.randn(num_blocks, dim, BLOCK, generator=generator).to(pool_dtype)
    values = torch.randn(num_blocks, BLOCK, dim, generator=generator).to(pool_dtype)
    order = torch.randperm(num_blocks - 1, generator=generator) + 1
    block_tables = torch.zeros(seqs, kv_heads, max_blocks, dtype=torch.int64)
    for flat, length in enumerate(lengths.view(-1).tolist()):
        used = -(-length // BLOCK)
        block_tables.view(-1, max_blocks)[flat, :used] = order[flat * max_blocks: flat * max_blocks + used]
    return keys, values, block_tables


def read_entries(keys, values, table, length):
    """The first `length` keys and values of one (seq, KV head), [length, dim] each in float32."""
    head_keys = torch.cat([keys[block].T for block in table]).float()[:length]
    head_values = torch.cat([values[block] for block in table]).float()[:length]
    return head_keys, head_values


def naive_attention(q, keys, values, block_tables, lengths, scale, window=0):
    """Per sequence and query head: that KV head's entries read block by block, then a plain softmax."""
    seqs, heads, dim = q.shape
    kv_heads = block_tables.shape[1]
    out = torch.empty(seqs, heads, dim)
    for seq in range(seqs):
        for head in range(heads):
            kv_head = head // (heads // kv_heads)
            length = int(lengths[seq, kv_head])
            head_keys, head_values = read_entries(keys, values, block_tables[seq, kv_head], length)
            first = max(0, length - window) if window > 0 else 0
            logits = head_keys[first:] @ q[seq, head].float() * scale
            out[seq, head] = torch.softmax(logits, 0) @ head_values[first:]
    return out


@pytest.mark.parametrize("window", [0, 20])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("dim", [64, 48])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.float16])
def test_the_torch_version_matches_a_naive_softmax(pool_dtype, dim, group, window):
    q, keys, values, tables, lengths = make_case(3, 3, group, dim, pool_dtype, seed=group)
    expected = naive_attention(q, keys, values, tables, lengths, dim**-0.5, window)
    out = paged_decode_attention_torch(q, keys, values, tables, lengths, dim**-0.5, window)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_the_torch_version_returns_q_dtype_and_fills_out():
    q, keys, values, tables, lengths = make_case(2, 2, 2, 64, torch.bfloat16, q_dtype=torch.bfloat16)
    expected = naive_attention(q, keys, values, tables, lengths, 0.125)
    out = torch.empty_like(q)
    returned = paged_decode_attention(q, keys, values, tables, lengths, 0.125, out=out)
    assert returned is out and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)


SOME_LENGTHS = torch.tensor([3, 4])


@pytest.mark.parametrize("read_on_host", [
    lambda t: t.sum().item(), lambda t: int(t[0]), lambda t: bool(t[0] > 1), lambda t: t.tolist(), lambda t: t.numpy(),
    lambda t: t.nonzero(), lambda t: t[t > 3], lambda t: t.masked_select(t > 3), lambda t: t.index_put_((t > 3,), t[:1]),
])
def test_the_checker_catches_host_syncs(read_on_host):
    with pytest.raises(AssertionError, match="host sync"), no_host_sync():
        read_on_host(SOME_LENGTHS.clone())


def test_the_checker_lets_static_shapes_pass():
    with no_host_sync():
        SOME_LENGTHS.clone().masked_fill_(SOME_LENGTHS > 3, 0)[torch.tensor([1, 0])].sum()


@pytest.mark.parametrize("window", [0, 20])
def test_the_torch_version_makes_no_host_sync(window):
    q, keys, values, tables, lengths = make_case(2, 3, 3, 48, torch.float16)
    with no_host_sync():
        paged_decode_attention_torch(q, keys, values, tables, lengths, 0.1, window)


@pytest.fixture(scope="module")
def triton_decode():
    """(tokensieve.engine.triton_decode, the device to test it on): see conftest.triton_modules."""
    with triton_modules("tokensieve.engine.triton_decode") as ((module,), device):
        yield module, device


@pytest.mark.parametrize(
    "dtypes, dim, group, window, num_splits",
    [
        ((torch.float32, torch.float32), 64, 1, 0, 1),
        ((torch.float32, torch.float32), 48, 3, 20, 2),
        ((torch.float32, torch.float32), 64, 4, 0, 8),  # more splits than most heads have blocks
        ((torch.float32, torch.float16), 64, 3, 0, 3),
        ((torch.float16, torch.float16), 64, 4, 20, 1),
        ((torch.float16, torch.float16), 48, 1, 0, 5),
    ],
)
def test_the_triton_kernels_match_a_naive_softmax(triton_decode, dtypes, dim, group, window, num_splits):
    module, device = triton_decode
    q_dtype, pool_dtype = dtypes
    case = make_case(3, 2, group, dim, pool_dtype, q_dtype, seed=num_splits)
    expected = naive_attention(*case, dim**-0.5, window)
    out = module.paged_decode_attention_triton(*(t.to(device) for t in case), dim**-0.5, window, num_splits=num_splits)
    assert out.dtype == q_dtype and not out.isnan().any()
    tolerance = 1e-5 if q_dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.cpu().float(), expected, atol=tolerance, rtol=tolerance)


def test_the_triton_kernels_write_into_out_and_read_strided_q(triton_decode):
    module, device = triton_decode
    q, keys, values, tables, lengths = make_case(2, 2, 2, 64, torch.float32)
    expected = naive_attention(q, keys, values, tables, lengths, 0.125)
    q, keys, values, tables, lengths = (t.to(device) for t in (q, keys, values, tables, lengths))
    fused = torch.cat([q, torch.randn_like(q)], dim=1)[:, : q.shape[1]]  # q as a slice of a wider projection
    out = torch.empty_like(q)
    returned = module.paged_decode_attention_triton(fused, keys, values, tables, lengths, 0.125, out=out, num_splits=2)
    assert returned is out
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


def test_num_splits_fill_the_gpu_within_bounds(triton_decode):
    choose_num_splits = triton_decode[0].choose_num_splits
    assert choose_num_splits(seqs=1, kv_heads=8, max_blocks=512, multiprocessors=132) == 33
    assert choose_num_splits(seqs=1, kv_heads=1, max_blocks=512, multiprocessors=132) == 64
    assert choose_num_splits(seqs=1, kv_heads=1, max_blocks=3, multiprocessors=132) == 3
    assert choose_num_splits(seqs=256, kv_heads=8, max_blocks=512, multiprocessors=132) == 1
    assert choose_num_splits(seqs=1, kv_heads=8, max_blocks=512, multiprocessors=132, row_tiles=4) == 9


# Draft trees. Entries before the tree per (seq, KV head), cycled over kv_heads=2: seq 1 (whose tree has all
# `rows` nodes) has no prefix on KV head 0 and fills the table on KV head 1; seq 2 has none on KV head 0 (its
# padding rows see nothing of the tree) and its tree straddles a block edge on KV head 1.
PREFIXES = [40, 7, 0, 63, 0, 15]
TREE_SIZES = {1: [1, 1, 1], 4: [1, 4, 3], 17: [1, 17, 9]}  # block_rows per seq: plain decoding, == rows, between


def random_tree_visibility(tree_size, rows, generator):
    """bool [rows, rows]: the first `tree_size` rows see themselves and their ancestors in a random tree (the
    parent of node t drawn from 0..t-1); padding rows see nothing, columns past the tree hold noise."""
    visibility = torch.rand(rows, rows, generator=generator) < 0.5
    visibility[tree_size:] = False
    tree = torch.eye(tree_size, dtype=torch.bool)
    for node in range(1, tree_size):
        tree[node] |= tree[int(torch.randint(node, (1,), generator=generator))]
    visibility[:tree_size, :tree_size] = tree
    return visibility


def make_tree_case(rows, group, dim, pool_dtype, q_dtype=torch.float32, index_dtype=torch.int64, seed=0,
                   tree_sizes=None, prefixes=PREFIXES, kv_heads=2):
    """(q [seqs, rows, heads, dim], keys, values, block_tables, lengths, block_visibility, block_rows)."""
    generator = torch.Generator().manual_seed(seed)
    block_rows = torch.tensor(tree_sizes or TREE_SIZES[rows])
    seqs = len(block_rows)
    lengths = torch.tensor(prefixes[: seqs * kv_heads]).view(seqs, kv_heads) + block_rows.view(seqs, 1)
    keys, values, block_tables = make_pool(lengths, dim, pool_dtype, generator, -(-int(lengths.max()) // BLOCK))
    q = torch.randn(seqs, rows, kv_heads * group, dim, generator=generator).to(q_dtype)
    visibility = torch.stack([random_tree_visibility(int(size), rows, generator) for size in block_rows])
    return (q, keys, values, block_tables.to(index_dtype), lengths.to(index_dtype), visibility,
            block_rows.to(index_dtype))


def naive_tree_attention(q, keys, values, block_tables, lengths, scale, block_visibility, block_rows):
    """Per sequence, real row and query head: the entries before the tree and the tree entries that row sees,
    then a plain softmax; padding rows are NaN."""
    seqs, rows, heads, dim = q.shape
    kv_heads = block_tables.shape[1]
    group = heads // kv_heads
    out = torch.full((seqs, rows, heads, dim), float("nan"))
    for seq in range(seqs):
        tree_size = int(block_rows[seq])
        for kv_head in range(kv_heads):
            length = int(lengths[seq, kv_head])
            head_keys, head_values = read_entries(keys, values, block_tables[seq, kv_head], length)
            heads_of_group = slice(kv_head * group, (kv_head + 1) * group)
            for row in range(tree_size):
                seen = torch.cat([torch.ones(length - tree_size, dtype=torch.bool), block_visibility[seq, row, :tree_size]])
                logits = q[seq, row, heads_of_group].float() @ head_keys[seen].T * scale
                out[seq, row, heads_of_group] = torch.softmax(logits, -1) @ head_values[seen]
    return out


def assert_matches_on_real_rows(out, expected, block_rows, tolerance):
    """The real rows match; the padding rows are finite."""
    assert out.float().isfinite().all()
    real = torch.arange(out.shape[1]) < block_rows.cpu().view(-1, 1)
    torch.testing.assert_close(out.cpu().float()[real], expected[real], atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("rows", [1, 4, 17])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.float16])
def test_the_torch_version_verifies_trees_like_a_naive_softmax(pool_dtype, group, rows):
    index_dtype = torch.int32 if rows == 17 else torch.int64
    *case, visibility, block_rows = make_tree_case(rows, group, 48, pool_dtype, index_dtype=index_dtype, seed=rows)
    expected = naive_tree_attention(*case, 48**-0.5, visibility, block_rows)
    out = paged_decode_attention(*case, 48**-0.5, block_visibility=visibility, block_rows=block_rows)
    assert out.shape == case[0].shape
    assert_matches_on_real_rows(out, expected, block_rows, 1e-5)


def test_a_tree_of_single_nodes_is_plain_decoding():
    q, keys, values, tables, lengths = make_case(3, 2, 4, 32, torch.float32)
    sees_itself = torch.ones(3, 1, 1, dtype=torch.bool)
    out = paged_decode_attention_torch(q.unsqueeze(1), keys, values, tables, lengths, 0.2, block_visibility=sees_itself,
                                       block_rows=torch.ones(3, dtype=torch.int64))
    torch.testing.assert_close(out.squeeze(1), paged_decode_attention_torch(q, keys, values, tables, lengths, 0.2))


def test_the_torch_version_fills_out_in_q_dtype_for_trees():
    q, *case, visibility, block_rows = make_tree_case(4, 2, 32, torch.bfloat16, q_dtype=torch.bfloat16)
    expected = naive_tree_attention(q, *case, 0.15, visibility, block_rows)
    out = torch.full_like(q, float("nan"))
    returned = paged_decode_attention(q, *case, 0.15, out=out, block_visibility=visibility, block_rows=block_rows)
    assert returned is out and out.dtype == torch.bfloat16
    assert_matches_on_real_rows(out, expected, block_rows, 1e-2)


def test_the_torch_version_makes_no_host_sync_for_trees():
    *case, visibility, block_rows = make_tree_case(17, 4, 32, torch.float16, index_dtype=torch.int32)
    with no_host_sync():
        paged_decode_attention_torch(*case, 0.1, block_visibility=visibility, block_rows=block_rows)


def test_trees_refuse_a_window_and_a_missing_argument(triton_decode):
    *case, visibility, block_rows = make_tree_case(4, 1, 32, torch.float32)
    for attention in (paged_decode_attention, paged_decode_attention_torch, triton_decode[0].paged_decode_attention_triton):
        with pytest.raises(ValueError, match="sliding window"):
            attention(*case, 0.1, 20, block_visibility=visibility, block_rows=block_rows)
        with pytest.raises(ValueError, match="go together"):
            attention(*case, 0.1, block_visibility=visibility)


@pytest.mark.parametrize(
    "dtypes, dim, group, rows, num_splits, index_dtype",
    [
        ((torch.float32, torch.float32), 32, 4, 1, 1, torch.int64),
        ((torch.float32, torch.float16), 48, 1, 1, 3, torch.int32),
        ((torch.float16, torch.float16), 32, 1, 4, 1, torch.int64),
        ((torch.float32, torch.float32), 32, 4, 4, 3, torch.int32),
        ((torch.float32, torch.float16), 48, 4, 17, 1, torch.int32),  # 68 query rows: two row tiles
        ((torch.float32, torch.float32), 32, 1, 17, 3, torch.int64),
    ],
)
def test_the_triton_kernels_verify_trees_like_a_naive_softmax(triton_decode, dtypes, dim, group, rows, num_splits,
                                                              index_dtype):
    module, device = triton_decode
    q_dtype, pool_dtype = dtypes
    case = make_tree_case(rows, group, dim, pool_dtype, q_dtype, index_dtype, seed=num_splits)
    expected = naive_tree_attention(*case[:5], dim**-0.5, *case[5:])
    q, keys, values, tables, lengths, visibility, block_rows = (t.to(device) for t in case)
    out = torch.full_like(q, float("nan"))
    returned = module.paged_decode_attention_triton(q, keys, values, tables, lengths, dim**-0.5, out=out,
                                                    block_visibility=visibility, block_rows=block_rows,
                                                    num_splits=num_splits)
    assert returned is out and out.dtype == q_dtype
    assert_matches_on_real_rows(out, expected, block_rows, 1e-5 if q_dtype == torch.float32 else 2e-3)


def test_both_versions_verify_trees_of_128_rows_for_groups_of_8(triton_decode):
    module, device = triton_decode
    case = make_tree_case(128, 8, 16, torch.float32, tree_sizes=[100], prefixes=[30], kv_heads=1)  # 16 row tiles
    expected = naive_tree_attention(*case[:5], 0.25, *case[5:])
    q, keys, values, tables, lengths, visibility, block_rows = case
    torch_out = paged_decode_attention_torch(q, keys, values, tables, lengths, 0.25, block_visibility=visibility,
                                             block_rows=block_rows)
    assert_matches_on_real_rows(torch_out, expected, block_rows, 1e-5)
    q, keys, values, tables, lengths, visibility, block_rows = (t.to(device) for t in case)
    triton_out = module.paged_decode_attention_triton(q, keys, values, tables, lengths, 0.25, block_visibility=visibility,
                                                      block_rows=block_rows, num_splits=3)
    assert_matches_on_real_rows(triton_out, expected, block_rows, 1e-5)


def test_both_versions_read_the_table_rows_places_name(triton_decode):
    """Sequence s reads row places[s] of a table with more rows than sequences (the static step's tables)."""
    module, device = triton_decode
    q, keys, values, tables, lengths = make_case(3, 2, 2, 32, torch.float32, seed=1)
    expected = naive_attention(q, keys, values, tables, lengths, 0.2)
    places = torch.tensor([4, 0, 2])
    spread = torch.randint(0, keys.shape[0], (5, *tables.shape[1:]), generator=torch.Generator().manual_seed(0))
    spread[places] = tables
    torch.testing.assert_close(paged_decode_attention(q, keys, values, spread, lengths, 0.2, places=places), expected)
    q, keys, values, spread, lengths, places = (t.to(device) for t in (q, keys, values, spread, lengths, places))
    out = module.paged_decode_attention_triton(q, keys, values, spread, lengths, 0.2, places=places, num_splits=2)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)
