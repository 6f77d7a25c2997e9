"""Attention over the paged KV pool for one flat batch.

The model calls `PagedAttention(layer, q, k, v)` once per layer. The new keys and values are
written to their slots in the pool, then each sequence attends to every entry its (layer, KV head)
holds. Decoding sequences (one query each) are attended together; each prefill chunk alone.
Visibility comes from the positions stored with the entries: a query at position p sees the
entries computed at positions <= p (and > p - window with a sliding window).

A speculating sequence adds several rows to the decode group, one per node of its verification
block; they attend together over its block table. The block's own entries are the last ones of
every (layer, head), and `DecodeGroup.block_visibility` says which of them each row sees (a node
sees its ancestors, not its siblings).

A KV policy that needs attention gets it through an observer: after attending, the scaled q.k
logits of the observed queries over the sequence's stored entries are handed to it, per layer.

With block selection (Quest), a decoding query attends only to the blocks of each (layer, KV head)
that block_selection.py picks (or, with TokenSelect's reuse, that it picked for an earlier similar
query: selection_cache.py); rows verifying a draft tree, and sequences whose attention a policy
observes, attend to everything.

The pool may hold quantized blocks (quantized_kv_pool.py): decoding reads them in place through the
native kernels, prefill and policies read them dequantized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import KVSelectionConfig
from .block_selection import block_bounds, select_blocks, shortlist_scores, shortlisted
from .kv_pool import KVPool
from .selection_cache import Choice


# observer(layer, logits [kv_heads, group, queries, entries], first query, observed queries this forward)
Observer = Callable[[int, torch.Tensor, int, int], None]
OBSERVED_QUERIES_PER_SLICE = 256  # bounds the logits held at once while observing a long chunk
UNUSED = torch.empty(0)  # a kernel argument the call does not read (no draft verified, no shortlist rescored)


@dataclass
class DecodeGroup:
    """Decoding sequences, rows 0..rows-1 of the flat batch: one row each, or one per node of a
    verification block. A sequence's rows (its "slots") attend together, as extra query heads of
    the same KV heads, so its cache is read once however many nodes it verifies."""

    block_tables: torch.Tensor  # [layers, seqs, kv_heads, blocks]
    lengths: torch.Tensor  # [layers, seqs, kv_heads] entries after this step's write
    query_positions: torch.Tensor  # [seqs, slots]
    row_of_slot: torch.Tensor  # [seqs, slots]: the flat row of each slot (padding repeats the first)
    slot_of_row: torch.Tensor | None  # [rows]: seq * slots + slot of each row (None: one slot per sequence)
    layers_aligned: bool  # every layer holds the same entries at the same places: one mask serves all
    observers: dict[int, Observer] = field(default_factory=dict)  # by sequence: who records its first slot's attention
    block_visibility: torch.Tensor | None = None  # bool [seqs, slots, slots]: slot s sees its block's entry t
    block_rows: torch.Tensor | None = None  # [seqs]: entries of each sequence's block (the last of each head)
    selection_caches: list | None = None  # per sequence: (its SelectionCache, its block table's version), with reuse

    @property
    def num_rows(self) -> int:
        return self.row_of_slot.shape[0] if self.slot_of_row is None else self.slot_of_row.shape[0]

    def hide_block_entries(self, layer: int, mask: torch.Tensor) -> None:
        """Clear, in mask [seqs, kv_heads, slots, entries], the block entries a slot does not see."""
        slots = self.row_of_slot.shape[1]
        last = self.block_rows.view(-1, 1, 1) - 1
        t = torch.minimum(torch.arange(slots, device=mask.device).view(1, 1, -1), last)  # padding repeats the last
        entries = (self.lengths[layer].unsqueeze(-1) - 1 - last + t).unsqueeze(2).expand(-1, -1, slots, -1)
        seen = self.block_visibility.gather(-1, t.expand(-1, slots, -1)).unsqueeze(1)
        mask.scatter_(-1, entries, mask.gather(-1, entries) & seen)


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
    query_observer: Callable[[int, torch.Tensor], None] | None = None  # given (layer, the chunk's queries)


def _attention_with_lse(q, keys, values, is_causal=False, attn_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's output [batch, heads, queries, dim] and the log-sum-exp of each query's scaled logits
    [batch, heads, queries], from the CPU flash kernel SDPA itself runs (attn_mask additive, in q's dtype)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, keys, values, 0.0, is_causal, attn_mask=attn_mask)


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
        dtype: torch.dtype = torch.float32,
        selection: KVSelectionConfig | None = None,
    ):
        self.pool = pool
        self.dtype = dtype  # the model's: what queries are, and what gathered keys and values become
        self.write_slots = write_slots  # [layers, tokens, kv_heads]
        self.decode = decode
        self.prefills = prefills
        self.sliding_window = sliding_window
        self.scratch = {} if scratch is None else scratch  # gather buffers, reused across layers and steps
        # native kernels read the decode cache in place (a float32, float16 or quantized pool); with a sliding
        # window, masks need positions
        self.kernels = kernels if sliding_window is None and pool.kernels is not None else None
        # positions are the same in every layer: store them for all layers at once
        pool.positions.view(-1)[write_slots] = write_positions.expand_as(write_slots)
        # selection applies to plain decoding rows that no policy observes, with no sliding window
        selects = decode is not None and decode.slot_of_row is None and not decode.observers and sliding_window is None
        self.selection = selection if selects else None
        if self.selection is not None:  # blocks each (layer, sequence, KV head) attends to, for all layers at once
            self._budget_blocks = self.selection.budget_blocks(decode.lengths, pool.block_size)
        self.selected_lengths: list[torch.Tensor] = []  # the entries decoding attended to, per selected layer
        self.reused_choices = 0  # selecting layers that reused an earlier choice (TokenSelect)
        self._chosen: tuple[torch.Tensor, torch.Tensor] | None = None  # places and lengths a selection layer chose
        self._shared_decode_mask = None
        if decode is not None and decode.layers_aligned and self.kernels is None and self.selection is None:
            self._shared_decode_mask = self._decode_mask(0)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [tokens, heads, dim], k and v [tokens, kv_heads, dim] -> [tokens, heads, dim]."""
        self.pool.store(self.write_slots[layer], k, v)
        if self.decode is not None and not self.prefills:
            return self._attend_decode(layer, q)
        out = torch.empty_like(q)
        if self.decode is not None:
            rows = self.decode.num_rows
            out[:rows] = self._attend_decode(layer, q[:rows])
        for chunk in self.prefills:
            rows = slice(chunk.start, chunk.end)
            out[rows] = self._attend_prefill(layer, chunk, q[rows], k[rows], v[rows])
            if chunk.observer is not None:
                self._observe_prefill(layer, chunk, q[rows])
            if chunk.query_observer is not None:
                chunk.query_observer(layer, q[rows])
        return out

    def _gather(self, block_tables: torch.Tensor, names=("keys", "values")) -> tuple[torch.Tensor, ...]:
        """Keys and values [..., entries, dim] of the given blocks in the model's dtype, copied into reused
        buffers (a fresh multi-megabyte tensor per layer costs more in page faults than the copy itself)."""
        ids = block_tables.flatten()
        block_shape = (len(ids), self.pool.block_size, self.pool.head_dim)
        shape = block_tables.shape[:-1] + (-1, self.pool.head_dim)
        gathered = []
        for name in names:
            stored = self.pool.read_blocks(name, ids, out=self._buffer(name, block_shape, self.pool.read_dtype))
            if self.pool.read_dtype != self.dtype:  # a narrower pool: widen once, into a buffer of its own
                stored = self._buffer(f"{name} widened", block_shape, self.dtype).copy_(stored)
            gathered.append(stored.view(shape))
        return tuple(gathered)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self.scratch.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self.scratch[name] = torch.empty(numel, dtype=dtype, device=self.pool.device)
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
        """[seqs, kv_heads, slots, entries]: which gathered entries each slot of each sequence sees."""
        group = self.decode
        lengths = group.lengths[layer]
        if self.sliding_window is None:  # every stored entry precedes the query
            entries = group.block_tables.shape[-1] * self.pool.block_size
            mask = (torch.arange(entries, device=lengths.device) < lengths.unsqueeze(-1)).unsqueeze(-2)
            mask = mask.expand(-1, -1, group.row_of_slot.shape[1], -1).clone() if group.block_visibility is not None else mask
        else:
            entry_positions = self._entry_positions(group.block_tables[layer])
            mask = self._visible(lengths, entry_positions, group.query_positions.unsqueeze(1))
        if group.block_visibility is not None:
            group.hide_block_entries(layer, mask)
        return mask

    def _grouped_queries(self, q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """[rows, heads, dim] -> [seqs, kv_heads, slots * group, dim]: a KV head's query heads and slots together."""
        group = self.decode
        seqs, slots = group.row_of_slot.shape
        if group.slot_of_row is None:
            return q.view(seqs, num_kv_heads, -1, q.shape[-1])
        per_slot = q[group.row_of_slot.flatten()].view(seqs, slots, num_kv_heads, -1, q.shape[-1])
        return per_slot.transpose(1, 2).reshape(seqs, num_kv_heads, -1, q.shape[-1])

    def _ungrouped(self, out: torch.Tensor) -> torch.Tensor:
        """[seqs, kv_heads, slots * group, dim] -> [rows, heads, dim]."""
        group = self.decode
        seqs, num_kv_heads, _, head_dim = out.shape
        if group.slot_of_row is None:
            return out.reshape(seqs, -1, head_dim)
        per_slot = out.view(seqs, num_kv_heads, group.row_of_slot.shape[1], -1, head_dim).transpose(1, 2)
        return per_slot.reshape(-1, per_slot.shape[2] * per_slot.shape[3], head_dim)[group.slot_of_row]

    def _decode_blocks(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block tables and lengths [seqs, kv_heads, ...] the decoding rows attend through in `layer`."""
        tables, lengths = self.decode.block_tables[layer], self.decode.lengths[layer]
        selection = self.selection
        if selection is None or layer < selection.dense_layers:
            return tables, lengths
        if self._chosen is not None and not selection.selects_in(layer):  # TidalDecode: reuse the places chosen
            places, selected_lengths = self._chosen
            selected = torch.gather(tables, -1, places)
        else:
            reused = self._reused_choice(layer, q, tables, lengths)
            self.reused_choices += reused is not None
            selected, selected_lengths, places = reused or self._choose(layer, q, tables, lengths)
            if selection.selection_layers is not None and self.decode.layers_aligned:  # a place is the same positions in every layer
                self._chosen = places, selected_lengths
        self.selected_lengths.append(selected_lengths)
        return selected, selected_lengths

    def _choose(self, layer: int, q: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor):
        """Quest's choice for every decoding sequence: (block tables, lengths, places) of the chosen blocks;
        remembered per sequence when choices are reused."""
        pool = self.pool
        budget = self._budget_blocks[layer]
        shortlist = self.selection.shortlist or 0
        if self.kernels is not None:
            keys = pool.keys if shortlist else UNUSED
            selected, selected_lengths, places = self.kernels.select_blocks(
                q, pool.key_min, pool.key_max, tables, lengths, budget, pool.block_size, keys, shortlist
            )
        else:
            queries = self._per_sequence(q, tables)
            bounds = block_bounds(queries, pool.key_min[tables], pool.key_max[tables])
            if shortlist:
                listed = shortlisted(bounds, lengths, budget, pool.block_size, shortlist)
                keys = pool.read_blocks("keys", tables.flatten()).view(*tables.shape, pool.block_size, -1)  # all: a reference
                bounds = shortlist_scores(queries, keys, listed)
            selected, selected_lengths, places = select_blocks(bounds, tables, lengths, budget, pool.block_size)
        if self.decode.selection_caches is not None:
            for seq, (cache, version) in enumerate(self.decode.selection_caches):
                cache.choices[layer] = Choice(self._per_sequence(q, tables)[seq].clone(), places[seq], selected_lengths[seq],
                                              lengths[seq].clone(), budget[seq], version)
        return selected, selected_lengths, places

    def _reused_choice(self, layer: int, q: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor):
        """TokenSelect: the blocks every decoding sequence chose for an earlier, similar query (None if one
        of them must choose again; then all do). The chosen blocks' entries grew with the last block's."""
        if self.decode.selection_caches is None:
            return None
        queries, budget = self._per_sequence(q, tables), self._budget_blocks[layer]
        choices = [cache.reusable(layer, queries[seq], budget[seq], version, self.selection.reuse_above)
                   for seq, (cache, version) in enumerate(self.decode.selection_caches)]
        if any(choice is None for choice in choices) or len({c.places.shape for c in choices}) > 1:
            return None
        places = torch.stack([c.places for c in choices])
        grown = lengths - torch.stack([c.lengths for c in choices])
        return torch.gather(tables, -1, places), torch.stack([c.selected_lengths for c in choices]) + grown, places

    @staticmethod
    def _per_sequence(q: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Decoding queries [seqs, heads, dim] as [seqs, kv_heads, group, dim]."""
        return q.view(tables.shape[0], tables.shape[1], -1, q.shape[-1])

    def _attend_decode(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self._attend_decode_in_place(layer, q)
        group = self.decode
        head_dim = q.shape[-1]
        tables, lengths = self._decode_blocks(layer, q)
        keys, values = self._gather(tables)  # [seqs, kv_heads, entries, dim]
        seqs, num_kv_heads, slots = keys.shape[0], keys.shape[1], group.row_of_slot.shape[1]
        if self.selection is not None:
            mask = (torch.arange(keys.shape[2], device=keys.device) < lengths.unsqueeze(-1)).unsqueeze(-2)
        else:
            mask = self._shared_decode_mask if self._shared_decode_mask is not None else self._decode_mask(layer)
        if slots > 1:  # each slot's mask serves its query heads
            mask = mask.unsqueeze(3).expand(-1, -1, -1, q.shape[1] // num_kv_heads, -1).reshape(seqs, num_kv_heads, -1, mask.shape[-1])
        grouped_q = self._grouped_queries(q, num_kv_heads)
        out = F.scaled_dot_product_attention(grouped_q, keys, values, attn_mask=mask)
        for seq, observer in group.observers.items():
            first_slot = grouped_q[seq, :, : q.shape[1] // num_kv_heads]
            logits = (first_slot @ keys[seq].transpose(-1, -2)) * head_dim**-0.5  # [kv_heads, group, entries]
            observer(layer, logits.masked_fill(~mask[seq, :, : first_slot.shape[1]], float("-inf")).unsqueeze(2), 0, 1)
        return self._ungrouped(out)

    def _attend_decode_in_place(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """The kernels read each slot's queries from its row of q and write its output there."""
        group = self.decode
        head_dim = q.shape[-1]
        tables, lengths = self._decode_blocks(layer, q)
        block_rows = group.block_rows if group.block_rows is not None else UNUSED
        visibility = group.block_visibility if group.block_visibility is not None else UNUSED
        scores = self.pool.paged_scores(q, tables, lengths, head_dim**-0.5, group.row_of_slot, visibility, block_rows)
        group_size = q.shape[1] // tables.shape[1]
        for seq, observer in group.observers.items():
            observer(layer, scores[seq, :, :group_size].unsqueeze(2), 0, 1)
        return self.pool.paged_softmax_values(scores, tables, lengths, group.row_of_slot, block_rows, q.shape[0])

    @staticmethod
    def _one_head_if_all_alike(lengths: torch.Tensor, entry_positions: torch.Tensor):
        """Head 0's lengths [1] and entry positions [1, entries] when every KV head holds the same entries
        (no policy evicted differently): one mask then serves every head, and SDPA's float copy of it is
        a KV-head count smaller (20 MB less for a 512-token chunk at 3k tokens on the default model)."""
        stored = int(lengths[0])
        if bool((lengths == stored).all()) and bool((entry_positions[:, :stored] == entry_positions[:1, :stored]).all()):
            return lengths[:1], entry_positions[:1]
        return lengths, entry_positions

    def _attend_prefill(self, layer, chunk: PrefillChunk, q, k, v) -> torch.Tensor:
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        # batch = KV heads, heads = the query heads of that group (4-D inputs take the fast CPU kernel)
        grouped_q = q.view(num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim).permute(1, 2, 0, 3)
        if self.sliding_window is None and (chunk.is_first or q.device.type == "cpu"):
            out = self._attend_own_then_stored(layer, chunk, grouped_q, k, v)
        else:
            keys, values = self._gather(chunk.block_tables[layer])  # [kv_heads, entries, dim]
            entry_positions = self._entry_positions(chunk.block_tables[layer])
            lengths, entry_positions = self._one_head_if_all_alike(chunk.lengths[layer], entry_positions)
            mask = self._visible(lengths, entry_positions, chunk.query_positions.view(1, num_tokens)).unsqueeze(1)
            out = F.scaled_dot_product_attention(grouped_q, *self._per_query_head(grouped_q, keys, values), attn_mask=mask)
        return out.permute(2, 0, 1, 3).reshape(num_tokens, num_heads, head_dim)

    @staticmethod
    def _per_query_head(grouped_q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys and values [kv_heads, entries, dim] as [kv_heads, group, entries, dim] views."""
        shape = grouped_q.shape[:2] + keys.shape[1:]
        return keys.unsqueeze(1).expand(shape), values.unsqueeze(1).expand(shape)

    def _attend_own_then_stored(self, layer, chunk: PrefillChunk, grouped_q, k, v) -> torch.Tensor:
        """A chunk's attention as two parts merged by their log-sum-exps: causal attention over its own
        entries, and unmasked attention over the entries stored before it (all earlier positions). Neither
        part needs a [queries, entries] mask, and the causal part skips its upper triangle, as one causal
        SDPA over the whole prompt would."""
        own_keys, own_values = self._per_query_head(grouped_q, k.transpose(0, 1), v.transpose(0, 1))
        stored_lengths = chunk.lengths[layer] - grouped_q.shape[2]  # the chunk's entries are the last of each head
        most = 0 if chunk.is_first else int(stored_lengths.max())
        if most == 0:  # the first chunk, or a layer a policy left with nothing (global budgets): only itself
            return F.scaled_dot_product_attention(grouped_q, own_keys, own_values, is_causal=True)
        own, own_lse = _attention_with_lse(grouped_q, own_keys, own_values, is_causal=True)
        blocks = chunk.block_tables[layer][:, : -(-most // self.pool.block_size)]
        keys, values = self._gather(blocks)
        keys, values = keys[:, :most], values[:, :most]
        mask = None
        if bool((stored_lengths < most).any()):  # a policy left the heads different lengths: hide the padding
            hidden = torch.arange(most, device=keys.device) >= stored_lengths.unsqueeze(-1)
            mask = torch.zeros(hidden.shape, dtype=grouped_q.dtype, device=keys.device).masked_fill_(hidden, float("-inf"))
            mask = mask.view(-1, 1, 1, most)
        # every stored entry precedes every query: a KV head's query heads attend as one long run of queries
        kv_heads, group, num_tokens, head_dim = grouped_q.shape
        stored, stored_lse = _attention_with_lse(
            grouped_q.reshape(kv_heads, 1, group * num_tokens, head_dim), keys.unsqueeze(1), values.unsqueeze(1), attn_mask=mask
        )
        stored, stored_lse = stored.view(grouped_q.shape), stored_lse.view(kv_heads, group, num_tokens)
        stored_lse.masked_fill_((stored_lengths == 0).view(-1, 1, 1), float("-inf"))  # the kernel gives such rows 0
        weight = torch.sigmoid(stored_lse - own_lse).unsqueeze(-1).to(own.dtype)  # stored's share of the softmax mass
        return own.lerp_(stored, weight)

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
