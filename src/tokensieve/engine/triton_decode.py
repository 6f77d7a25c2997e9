"""The Triton kernels behind paged_decode_attention on CUDA (flash-decoding).

Each program takes one (sequence, KV head, split, row tile): a tile of that KV head's query rows (its
group's heads, times the tree rows when verifying draft trees) against one range of its blocks, with an
online softmax, in float32. It writes the range's normalised output and log-sum-exp to scratch; a second
kernel weighs the splits of each (tree row, query head) together. With one split (a batch that fills
the GPU by itself) the first kernel writes the output and the second is not launched. The ranges are computed on the device
from the length, so the launch depends only on shapes (CUDA-graph safe).

Run on CPU tensors with TRITON_INTERPRET=1 set before this module is imported (the tests do).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .paged_decode import verifies_trees

MAX_SPLITS = 64
PROGRAMS_PER_SM = 2
MAX_TILE_ROWS = 64


@triton.jit
def _split_kernel(
    q_ptr, keys_ptr, values_ptr, tables_ptr, places_ptr, lengths_ptr, visibility_ptr, block_rows_ptr, partial_ptr, lse_ptr,
    out_ptr, stride_qs, stride_qr, stride_qh, stride_qd, stride_os, stride_or, stride_oh, stride_od,
    stride_kb, stride_kd, stride_ke,
    stride_vb, stride_ve, stride_vd,
    stride_ts, stride_th, stride_tb,
    stride_ls, stride_lh,
    stride_visibility_s, stride_visibility_r, stride_visibility_t, stride_block_rows,
    scale, window, num_splits,
    ROWS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE_ROWS: tl.constexpr, ROW_TILES: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_PAD: tl.constexpr,
    TREE: tl.constexpr, PLACES: tl.constexpr, ONE_SPLIT: tl.constexpr,
):
    seq, kv_head = tl.program_id(0), tl.program_id(1)
    split, row_tile = tl.program_id(2) // ROW_TILES, tl.program_id(2) % ROW_TILES
    query_rows = row_tile * TILE_ROWS + tl.arange(0, TILE_ROWS)  # (tree row, head of the group), heads fastest
    dims, offsets = tl.arange(0, DIM_PAD), tl.arange(0, BLOCK_PAD)
    row_ok, dim_ok, offset_ok = query_rows < ROWS * GROUP, dims < HEAD_DIM, offsets < BLOCK_SIZE
    tree_rows, heads = query_rows // GROUP, kv_head * GROUP + query_rows % GROUP

    q = tl.load(q_ptr + seq * stride_qs + tree_rows[:, None] * stride_qr + heads[:, None] * stride_qh
                + dims[None, :] * stride_qd, mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)

    length = tl.load(lengths_ptr + seq * stride_ls + kv_head * stride_lh).to(tl.int32)
    start = tl.where(window > 0, tl.maximum(length - window, 0), 0)
    first_block, end_block = start // BLOCK_SIZE, (length + BLOCK_SIZE - 1) // BLOCK_SIZE
    per_split = (end_block - first_block + num_splits - 1) // num_splits
    split_first = first_block + split * per_split
    split_end = tl.minimum(split_first + per_split, end_block)
    if TREE:  # the tree's entries close the (sequence, KV head); rows past its size (and past ROWS) see all
        tree_size = tl.load(block_rows_ptr + seq * stride_block_rows).to(tl.int32)
        tree_start = length - tree_size
        real_row, padding_row = tree_rows < tree_size, tree_rows >= tree_size
        visibility_rows = visibility_ptr + seq * stride_visibility_s + tree_rows * stride_visibility_r

    place = seq  # the sequence's row of the tables
    if PLACES:
        place = tl.load(places_ptr + seq)
    table = tables_ptr + place * stride_ts + kv_head * stride_th
    running_max = tl.full([TILE_ROWS], float("-inf"), tl.float32)
    running_sum = tl.zeros([TILE_ROWS], tl.float32)
    acc = tl.zeros([TILE_ROWS, DIM_PAD], tl.float32)
    for block in range(split_first, split_end):
        block_id = tl.load(table + block * stride_tb).to(tl.int64)  # a pool may hold more than 2**31 entries
        entries = block * BLOCK_SIZE + offsets
        attended = offset_ok & (entries >= start) & (entries < length)
        key_tile = tl.load(keys_ptr + block_id * stride_kb + dims[:, None] * stride_kd + offsets[None, :] * stride_ke,
                           mask=dim_ok[:, None] & offset_ok[None, :], other=0.0).to(tl.float32)
        scores = tl.dot(q, key_tile, input_precision="ieee") * scale
        if TREE:
            tree_entries = entries - tree_start
            visible = tl.load(visibility_rows[:, None] + tree_entries[None, :] * stride_visibility_t,
                              mask=real_row[:, None] & (attended & (tree_entries >= 0))[None, :], other=0)
            seen = attended[None, :] & ((tree_entries < 0)[None, :] | (visible != 0) | padding_row[:, None])
            scores = tl.where(seen, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            reference = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row may have seen nothing yet
        else:  # every block here holds an attended entry: the max stays finite
            scores = tl.where(attended[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            reference = new_max
        rescale = tl.exp(running_max - reference)
        weights = tl.exp(scores - reference[:, None])
        value_tile = tl.load(values_ptr + block_id * stride_vb + offsets[:, None] * stride_ve + dims[None, :] * stride_vd,
                             mask=attended[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        acc = acc * rescale[:, None] + tl.dot(weights, value_tile, input_precision="ieee")
        running_sum = running_sum * rescale + tl.sum(weights, 1)
        running_max = new_max

    has_entries = running_sum > 0  # a split left without blocks contributes nothing
    output = acc / tl.where(has_entries, running_sum, 1.0)[:, None]
    if ONE_SPLIT:  # the split is the whole softmax: write the output, no combine
        tl.store(out_ptr + seq * stride_os + tree_rows[:, None] * stride_or + heads[:, None] * stride_oh
                 + dims[None, :] * stride_od, output.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    else:
        lse = tl.where(has_entries, running_max + tl.log(tl.where(has_entries, running_sum, 1.0)), float("-inf"))
        scratch_row = ((seq * ROWS + tree_rows) * (tl.num_programs(1) * GROUP) + heads) * num_splits + split
        tl.store(partial_ptr + scratch_row[:, None] * HEAD_DIM + dims[None, :], output,
                 mask=row_ok[:, None] & dim_ok[None, :])
        tl.store(lse_ptr + scratch_row, lse, mask=row_ok)


@triton.jit
def _combine_kernel(
    partial_ptr, lse_ptr, out_ptr, stride_os, stride_or, stride_oh, stride_od, num_splits,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
):
    seq_row, head = tl.program_id(0), tl.program_id(1)  # seq_row = sequence * ROWS + tree row
    splits, dims = tl.arange(0, SPLITS_PAD), tl.arange(0, DIM_PAD)
    split_ok, dim_ok = splits < num_splits, dims < HEAD_DIM
    scratch_rows = (seq_row * tl.num_programs(1) + head) * num_splits + splits
    lse = tl.load(lse_ptr + scratch_rows, mask=split_ok, other=float("-inf"))
    weights = tl.exp(lse - tl.max(lse, 0))  # some split holds an entry the row sees: the max is finite
    partial = tl.load(partial_ptr + scratch_rows[:, None] * HEAD_DIM + dims[None, :],
                      mask=split_ok[:, None] & dim_ok[None, :], other=0.0)
    output = tl.sum(partial * weights[:, None], 0) / tl.sum(weights, 0)
    seq, row = seq_row // ROWS, seq_row % ROWS
    tl.store(out_ptr + seq * stride_os + row * stride_or + head * stride_oh + dims * stride_od,
             output.to(out_ptr.dtype.element_ty), mask=dim_ok)


@functools.cache
def _multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def tile_rows_for(rows: int, group: int) -> int:
    """Query rows per program: a KV head's rows * group, padded to a power of two, at least tl.dot's 16, at
    most MAX_TILE_ROWS (more rows take more tiles)."""
    return max(16, min(MAX_TILE_ROWS, triton.next_power_of_2(rows * group)))


def warps_for(tile_rows: int) -> int:
    """A 64-row tile runs on 8 warps: on 4, its float32 accumulators spill at head_dim 128
    (tests/test_triton_compile.py)."""
    return 4 if tile_rows <= 32 else 8


def choose_num_splits(seqs: int, kv_heads: int, max_blocks: int, multiprocessors: int, row_tiles: int = 1) -> int:
    """Splits per (sequence, KV head, row tile) that give about PROGRAMS_PER_SM programs per multiprocessor."""
    wanted = -(-PROGRAMS_PER_SM * multiprocessors // (seqs * kv_heads * row_tiles))
    return max(1, min(wanted, max_blocks, MAX_SPLITS))


def paged_decode_attention_triton(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor, lengths: torch.Tensor,
    scale: float, window: int = 0, out: torch.Tensor | None = None,
    block_visibility: torch.Tensor | None = None, block_rows: torch.Tensor | None = None, places: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """paged_decode_attention (which see) as Triton kernels; `num_splits` defaults to what fills the GPU
    (one split off CUDA, where only the interpreter runs)."""
    tree = verifies_trees(q, window, block_visibility, block_rows)
    if out is None:
        out = torch.empty_like(q)
    rows_q, rows_out = (q, out) if tree else (q.unsqueeze(1), out.unsqueeze(1))
    seqs, rows, heads, dim = rows_q.shape
    kv_heads, max_blocks = block_tables.shape[1:]
    block_size, group = keys.shape[-1], heads // kv_heads
    tile_rows = tile_rows_for(rows, group)
    row_tiles = triton.cdiv(rows * group, tile_rows)
    if num_splits is None:
        num_splits = (
            choose_num_splits(seqs, kv_heads, max_blocks, _multiprocessor_count(q.device), row_tiles) if q.is_cuda else 1
        )
    one_split = num_splits == 1
    partial = None if one_split else torch.empty(seqs, rows, heads, num_splits, dim, dtype=torch.float32, device=q.device)
    lse = None if one_split else torch.empty(seqs, rows, heads, num_splits, dtype=torch.float32, device=q.device)
    visibility = block_visibility.view(torch.uint8) if tree else None
    tree_strides = (*visibility.stride(), block_rows.stride(0)) if tree else (0, 0, 0, 0)
    dim_pad = max(16, triton.next_power_of_2(dim))
    _split_kernel[(seqs, kv_heads, num_splits * row_tiles)](
        rows_q, keys, values, block_tables, places, lengths, visibility, block_rows, partial, lse, rows_out,
        *rows_q.stride(), *rows_out.stride(), *keys.stride(), *values.stride(), *block_tables.stride(), *lengths.stride(), *tree_strides,
        scale, window, num_splits,
        ROWS=rows, GROUP=group, HEAD_DIM=dim, BLOCK_SIZE=block_size, TILE_ROWS=tile_rows, ROW_TILES=row_tiles,
        DIM_PAD=dim_pad, BLOCK_PAD=max(16, triton.next_power_of_2(block_size)), TREE=tree, PLACES=places is not None,
        ONE_SPLIT=one_split, num_warps=warps_for(tile_rows),
    )
    if one_split:
        return out
    _combine_kernel[(seqs * rows, heads)](
        partial, lse, rows_out, *rows_out.stride(), num_splits,
        ROWS=rows, HEAD_DIM=dim, SPLITS_PAD=triton.next_power_of_2(num_splits), DIM_PAD=dim_pad,
    )
    return out
