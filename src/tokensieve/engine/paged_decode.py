"""Decode attention over the paged KV pool: one query per sequence, each (sequence, KV head) with its own
block table row and length, optionally a sliding window; or several query rows per sequence that verify
a speculative draft tree whose entries close each (sequence, KV head).

On CUDA the Triton kernel of triton_decode.py runs; elsewhere the plain-PyTorch version below. Neither
syncs with the host, and their shapes and launches depend only on tensor shapes, so both can be
captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor, lengths: torch.Tensor,
    scale: float, window: int = 0, out: torch.Tensor | None = None,
    block_visibility: torch.Tensor | None = None, block_rows: torch.Tensor | None = None,
    places: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale * q.k) @ v of every query head over its KV head's entries, q's shape and dtype.

    q [seqs, heads, dim]; keys [blocks, dim, block_size] and values [blocks, block_size, dim] (the pool);
    block_tables [seqs, kv_heads, max_blocks] and lengths [seqs, kv_heads] (each >= 1), int32 or int64;
    given `places` (int64 [seqs]), sequence s reads row places[s] of block_tables instead of row s;
    `window` > 0 attends only to the last `window` entries of each (sequence, KV head).

    Draft trees: q [seqs, rows, heads, dim], block_rows [seqs] (1 <= block_rows[s] <= rows, and <= the
    lengths of s) and block_visibility bool [seqs, rows, rows]. The last block_rows[s] entries of each
    (s, KV head) are the tree's: row r sees every entry before them and tree entry t when
    block_visibility[s, r, t]. Rows r >= block_rows[s] are padding (they see every entry: finite output).
    """
    if q.is_cuda:
        from .triton_decode import paged_decode_attention_triton

        return paged_decode_attention_triton(
            q, keys, values, block_tables, lengths, scale, window, out, block_visibility, block_rows, places
        )
    if places is not None:
        block_tables = block_tables.index_select(0, places)
    return paged_decode_attention_torch(
        q, keys, values, block_tables, lengths, scale, window, out, block_visibility, block_rows
    )


def paged_decode_attention_torch(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor, lengths: torch.Tensor,
    scale: float, window: int = 0, out: torch.Tensor | None = None,
    block_visibility: torch.Tensor | None = None, block_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """paged_decode_attention in plain PyTorch: gathers all `max_blocks` blocks of every (sequence, KV head)
    and masks the entries past its length (and before its window, or hidden from a tree row), in float32."""
    tree = verifies_trees(q, window, block_visibility, block_rows)
    rows_q = q if tree else q.unsqueeze(1)
    seqs, rows, heads, dim = rows_q.shape
    kv_heads, max_blocks = block_tables.shape[1:]
    group = heads // kv_heads
    entries = max_blocks * keys.shape[-1]
    gathered_keys = keys[block_tables].transpose(-1, -2).reshape(seqs, kv_heads, entries, dim).float()
    gathered_values = values[block_tables].reshape(seqs, kv_heads, entries, dim).float()
    # [seqs, kv_heads, rows * group, dim]: the query rows of one KV head, its group's heads fastest
    grouped_q = rows_q.float().reshape(seqs, rows, kv_heads, group, dim).transpose(1, 2).reshape(seqs, kv_heads, -1, dim)
    if tree:
        attended = tree_entry_mask(lengths, entries, block_visibility, block_rows)  # [seqs, kv_heads, rows, entries]
        attended = attended.unsqueeze(3).expand(-1, -1, -1, group, -1).reshape(seqs, kv_heads, rows * group, entries)
    else:
        attended = entry_mask(lengths, entries, window).unsqueeze(2)  # [seqs, kv_heads, 1, entries]
    result = F.scaled_dot_product_attention(grouped_q, gathered_keys, gathered_values, attn_mask=attended, scale=scale)
    result = result.reshape(seqs, kv_heads, rows, group, dim).transpose(1, 2).reshape(q.shape)
    if out is None:
        return result.to(q.dtype)
    return out.copy_(result)


def verifies_trees(
    q: torch.Tensor, window: int, block_visibility: torch.Tensor | None, block_rows: torch.Tensor | None
) -> bool:
    """Whether the call verifies draft trees; ValueError when the arguments do not go together (shapes only)."""
    if block_visibility is None and block_rows is None:
        return False
    if block_visibility is None or block_rows is None:
        raise ValueError("block_visibility and block_rows go together")
    if window != 0:
        raise ValueError("draft trees with a sliding window are not supported")
    seqs, rows = q.shape[:2]
    if q.dim() != 4 or block_visibility.shape != (seqs, rows, rows) or block_rows.shape != (seqs,):
        raise ValueError("draft trees need q [seqs, rows, heads, dim], block_visibility [seqs, rows, rows] "
                         "and block_rows [seqs]")
    return True


def entry_mask(lengths: torch.Tensor, entries: int, window: int = 0) -> torch.Tensor:
    """bool [*lengths.shape, entries]: entry i is attended when i < length (and i >= length - window)."""
    index = torch.arange(entries, device=lengths.device)
    ends = lengths.unsqueeze(-1)
    attended = index < ends
    if window > 0:
        attended &= index >= ends - window
    return attended


def tree_entry_mask(
    lengths: torch.Tensor, entries: int, block_visibility: torch.Tensor, block_rows: torch.Tensor
) -> torch.Tensor:
    """bool [seqs, kv_heads, rows, entries]: entry i is seen by tree row r when i < length and it precedes
    the tree, or is a tree entry that r sees, or r is a padding row."""
    seqs, kv_heads = lengths.shape
    rows = block_visibility.shape[1]
    index = torch.arange(entries, device=lengths.device)
    ends = lengths.unsqueeze(-1)  # [seqs, kv_heads, 1]
    tree_entries = index - (ends - block_rows.view(seqs, 1, 1))  # [seqs, kv_heads, entries]: t, or < 0 before the tree
    visible = block_visibility.unsqueeze(1).expand(seqs, kv_heads, rows, rows).gather(
        3, tree_entries.clamp(0, rows - 1).unsqueeze(2).expand(seqs, kv_heads, rows, entries)
    )
    padding = torch.arange(rows, device=lengths.device) >= block_rows.view(seqs, 1)  # [seqs, rows]
    seen = (tree_entries < 0).unsqueeze(2) | visible | padding.view(seqs, 1, rows, 1)
    return (index < ends).unsqueeze(2) & seen
