"""Decode attention over the paged KV pool: one query per sequence, each (sequence, KV head) with its own
block table row and length, optionally a sliding window.

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
) -> torch.Tensor:
    """softmax(scale * q.k) @ v of every query head over its KV head's entries, [seqs, heads, dim] in q's dtype.

    q [seqs, heads, dim]; keys [blocks, dim, block_size] and values [blocks, block_size, dim] (the pool);
    block_tables [seqs, kv_heads, max_blocks] and lengths [seqs, kv_heads] (each >= 1), int64;
    `window` > 0 attends only to the last `window` entries of each (sequence, KV head).
    """
    if q.is_cuda:
        from .triton_decode import paged_decode_attention_triton

        return paged_decode_attention_triton(q, keys, values, block_tables, lengths, scale, window, out)
    return paged_decode_attention_torch(q, keys, values, block_tables, lengths, scale, window, out)


def paged_decode_attention_torch(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor, lengths: torch.Tensor,
    scale: float, window: int = 0, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """paged_decode_attention in plain PyTorch: gathers all `max_blocks` blocks of every (sequence, KV head)
    and masks the entries past its length (and before its window), in float32."""
    seqs, heads, dim = q.shape
    kv_heads, max_blocks = block_tables.shape[1:]
    entries = max_blocks * keys.shape[-1]
    gathered_keys = keys[block_tables].transpose(-1, -2).reshape(seqs, kv_heads, entries, dim).float()
    gathered_values = values[block_tables].reshape(seqs, kv_heads, entries, dim).float()
    grouped_q = q.reshape(seqs, kv_heads, heads // kv_heads, dim).float()
    attended = entry_mask(lengths, entries, window).unsqueeze(2)  # [seqs, kv_heads, 1, entries]
    result = F.scaled_dot_product_attention(grouped_q, gathered_keys, gathered_values, attn_mask=attended, scale=scale)
    result = result.reshape(seqs, heads, dim)
    if out is None:
        return result.to(q.dtype)
    return out.copy_(result)


def entry_mask(lengths: torch.Tensor, entries: int, window: int = 0) -> torch.Tensor:
    """bool [*lengths.shape, entries]: entry i is attended when i < length (and i >= length - window)."""
    index = torch.arange(entries, device=lengths.device)
    ends = lengths.unsqueeze(-1)
    attended = index < ends
    if window > 0:
        attended &= index >= ends - window
    return attended
