"""Attention over the paged KV pool for one flat batch.

The model calls `PagedAttention(layer, q, k, v)` once per layer. The new keys and values are
written to their slots in the pool, then each sequence attends to every entry its (layer, KV head)
holds. Decoding sequences (one query each) are attended together; each prefill chunk alone.
Visibility comes from the positions stored with the entries: a query at position p sees the
entries computed at positions <= p (and > p - window with a sliding window).

A KV policy that needs attention gets it through an observer: after attending, the scaled q.k
logits of the observed queries over the sequence's stored entries are handed to it, per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .kv_pool import KVPool


# observer(layer, logits [kv_heads, group, queries, entries], first query, observed queries this forward)
Observer = Callable[[int, torch.Tensor, int, int], None]
OBSERVED_QUERIES_PER_SLICE = 256  # bounds the logits held at once while observing a long chunk


@dataclass
class DecodeGroup:
    """Sequences that process one token each; their tokens are rows 0..batch-1."""

    block_tables: torch.Tensor  # [layers, batch, kv_heads, blocks]
    lengths: torch.Tensor  # [layers, batch, kv_heads] entries after this step's write
    query_positions: torch.Tensor  # [batch]
    layers_aligned: bool  # every layer holds the same entries at the same places: one mask serves all
    observers: dict[int, Observer] = field(default_factory=dict)  # by row: who records that query's attention


@dataclass
class PrefillChunk:
    """Consecutive tokens of one sequence, rows start..end of the flat batch."""

    start: int
    end: int
    block_tables: torch.Tensor  # [layers, kv_heads, blocks]
    lengths: torch.Tensor  # [layers, kv_heads]
    query_positions: torch.Tensor  # [tokens]
    is_first: bool  # nothing was stored before this chunk: plain causal attention over the chunk
    observer: Observer | None = None
    observed_queries: int | None = None  # the chunk's latest queries the observer sees (None: all)


class PagedAttention:
    def __init__(
        self,
        pool: KVPool,
        write_slots: torch.Tensor,
        write_positions: torch.Tensor,
        decode: DecodeGroup | None,
        prefills: list[PrefillChunk],
        sliding_window: int | None = None,
        scratch: dict[str, torch.Tensor] | None = None,
        kernels=None,
    ):
        self.pool = pool
        self.write_slots = write_slots  # [layers, tokens, kv_heads]
        self.decode = decode
        self.prefills = prefills
        self.sliding_window = sliding_window
        self.scratch = {} if scratch is None else scratch  # gather buffers, reused across layers and steps
        # native kernels read the decode cache in place; with a sliding window, masks need positions
        self.kernels = kernels if sliding_window is None else None
        # positions are the same in every layer: store them for all layers at once
        pool.positions.view(-1)[write_slots] = write_positions.expand_as(write_slots)
        self._shared_decode_mask = None
        if decode is not None and decode.layers_aligned and self.kernels is None:
            self._shared_decode_mask = self._decode_mask(0)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [tokens, heads, dim], k and v [tokens, kv_heads, dim] -> [tokens, heads, dim]."""
        slots = self.write_slots[layer]
        head_dim = k.shape[-1]
        self.pool.keys.view(-1, head_dim)[slots] = k
        self.pool.values.view(-1, head_dim)[slots] = v
        if self.decode is not None and not self.prefills:
            return self._attend_decode(layer, q)
        out = torch.empty_like(q)
        if self.decode is not None:
            batch = self.decode.query_positions.shape[0]
            out[:batch] = self._attend_decode(layer, q[:batch])
        for chunk in self.prefills:
            rows = slice(chunk.start, chunk.end)
            out[rows] = self._attend_prefill(layer, chunk, q[rows], k[rows], v[rows])
            if chunk.observer is not None:
                self._observe_prefill(layer, chunk, q[rows])
        return out

    def _gather(self, block_tables: torch.Tensor, names=("keys", "values")) -> tuple[torch.Tensor, ...]:
        """Keys and values [..., entries, dim] of the given blocks, copied into reused buffers
        (a fresh multi-megabyte tensor per layer costs more in page faults than the copy itself)."""
        ids = block_tables.flatten()
        block_shape = self.pool.keys.shape[1:]
        shape = block_tables.shape[:-1] + (-1, block_shape[-1])
        return tuple(
            torch.index_select(getattr(self.pool, name), 0, ids, out=self._buffer(name, (len(ids),) + block_shape)).view(shape)
            for name in names
        )

    def _buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self.scratch.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self.scratch[name] = torch.empty(numel, dtype=self.pool.keys.dtype, device=self.pool.keys.device)
        return buffer[:numel].view(shape)

    def _entry_positions(self, block_tables: torch.Tensor) -> torch.Tensor:
        return self.pool.positions[block_tables].flatten(-2)

    def _visible(self, lengths, entry_positions, query_positions) -> torch.Tensor:
        """Boolean mask [..., queries, entries]: stored, not in the future, inside the window."""
        entries = entry_positions.shape[-1]
        stored = torch.arange(entries, device=lengths.device) < lengths.unsqueeze(-1)
        query_positions = query_positions.unsqueeze(-1)
        visible = stored.unsqueeze(-2) & (entry_positions.unsqueeze(-2) <= query_positions)
        if self.sliding_window is not None:
            visible &= entry_positions.unsqueeze(-2) > query_positions - self.sliding_window
        return visible

    def _decode_mask(self, layer: int) -> torch.Tensor:
        """[batch, kv_heads, 1, entries]: which gathered entries each decoding sequence sees."""
        group = self.decode
        lengths = group.lengths[layer]
        if self.sliding_window is None:  # every stored entry precedes the query
            entries = group.block_tables.shape[-1] * self.pool.block_size
            stored = torch.arange(entries, device=lengths.device) < lengths.unsqueeze(-1)
            return stored.unsqueeze(-2)
        entry_positions = self._entry_positions(group.block_tables[layer])
        return self._visible(lengths, entry_positions, group.query_positions.view(-1, 1, 1))

    def _attend_decode(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self._attend_decode_in_place(layer, q)
        group = self.decode
        batch, num_heads, head_dim = q.shape
        keys, values = self._gather(group.block_tables[layer])  # [batch, kv_heads, entries, dim]
        num_kv_heads = keys.shape[1]
        mask = self._shared_decode_mask if self._shared_decode_mask is not None else self._decode_mask(layer)
        # the query heads sharing a KV head become the "query" axis of that head: no repeat of keys
        grouped_q = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
        out = F.scaled_dot_product_attention(grouped_q, keys, values, attn_mask=mask)
        for row, observer in group.observers.items():
            logits = (grouped_q[row] @ keys[row].transpose(-1, -2)) * head_dim**-0.5  # [kv_heads, group, entries]
            observer(layer, logits.masked_fill(~mask[row], float("-inf")).unsqueeze(2), 0, 1)
        return out.reshape(batch, num_heads, head_dim)

    def _attend_decode_in_place(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        batch, num_heads, head_dim = q.shape
        tables, lengths = self.decode.block_tables[layer], self.decode.lengths[layer]
        grouped_q = q.reshape(batch, tables.shape[1], -1, head_dim).contiguous()
        scores = self.kernels.paged_scores(grouped_q, self.pool.keys, tables, lengths, head_dim**-0.5)
        for row, observer in self.decode.observers.items():
            observer(layer, scores[row].unsqueeze(2), 0, 1)
        probs = torch.softmax(scores, dim=-1)
        out = self.kernels.paged_weighted_values(probs, self.pool.values, tables, lengths)
        return out.view(batch, num_heads, head_dim)

    def _attend_prefill(self, layer, chunk: PrefillChunk, q, k, v) -> torch.Tensor:
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        group_size = num_heads // num_kv_heads
        # batch = KV heads, heads = the query heads of that group (4-D inputs take the fast CPU kernel)
        grouped_q = q.view(num_tokens, num_kv_heads, group_size, head_dim).permute(1, 2, 0, 3)
        if chunk.is_first and self.sliding_window is None:
            keys, values = k.transpose(0, 1), v.transpose(0, 1)
            mask, causal = None, True
        else:
            keys, values = self._gather(chunk.block_tables[layer])  # [kv_heads, entries, dim]
            entry_positions = self._entry_positions(chunk.block_tables[layer])
            mask = self._visible(chunk.lengths[layer], entry_positions, chunk.query_positions.view(1, num_tokens))
            mask, causal = mask.unsqueeze(1), False
        shape = (num_kv_heads, group_size) + keys.shape[1:]
        out = F.scaled_dot_product_attention(
            grouped_q, keys.unsqueeze(1).expand(shape), values.unsqueeze(1).expand(shape), attn_mask=mask, is_causal=causal
        )
        return out.permute(2, 0, 1, 3).reshape(num_tokens, num_heads, head_dim)

    def _observe_prefill(self, layer: int, chunk: PrefillChunk, q: torch.Tensor) -> None:
        """Hand the observer the logits of the chunk's observed queries over all stored entries."""
        num_tokens, num_heads, head_dim = q.shape
        first = 0 if chunk.observed_queries is None else max(0, num_tokens - chunk.observed_queries)
        (keys,) = self._gather(chunk.block_tables[layer], ("keys",))  # [kv_heads, entries, dim]
        entry_positions = self._entry_positions(chunk.block_tables[layer])
        num_kv_heads = keys.shape[0]
        keys_t = keys.transpose(-1, -2).unsqueeze(1)  # [kv_heads, 1, dim, entries]
        for start in range(first, num_tokens, OBSERVED_QUERIES_PER_SLICE):
            end = min(start + OBSERVED_QUERIES_PER_SLICE, num_tokens)
            grouped_q = q[start:end].reshape(end - start, num_kv_heads, -1, head_dim).permute(1, 2, 0, 3)
            visible = self._visible(chunk.lengths[layer], entry_positions, chunk.query_positions[start:end].view(1, -1))
            logits = (grouped_q @ keys_t) * head_dim**-0.5  # [kv_heads, group, queries, entries]
            chunk.observer(layer, logits.masked_fill(~visible.unsqueeze(1), float("-inf")), start - first, num_tokens - first)
