"""The fixed buffers one bucket of the static decode step reads, and the attention that reads them.

A bucket is `batch` sequences of `rows` query rows each: one row for plain decoding, or the nodes of
a verification block (a draft tree, perhaps with a lookahead window), padded to `rows`. A step's
inputs travel packed in one flat int64 array whose fields `StepInputs.split` names (the same split
serves the host array being written and the device copy being spread over the buffers).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .kv_pool import KVPool
from .paged_decode import paged_decode_attention

WORD_BITS = 64  # a block's visibility travels as bits, a row's in ceil(rows / 64) int64 words


def visibility_words(masks: np.ndarray) -> np.ndarray:
    """bool [..., rows, rows] -> int64 [..., rows, words]: bit t of a row's words says it sees entry t."""
    rows = masks.shape[-1]
    padded = np.zeros(masks.shape[:-1] + (-(-rows // WORD_BITS) * WORD_BITS,), dtype=bool)
    padded[..., :rows] = masks
    return np.packbits(padded, axis=-1, bitorder="little").view("<i8")


def unpack_visibility(words: torch.Tensor, rows: int) -> torch.Tensor:
    """int64 [..., rows, words] -> bool [..., rows, rows] (visibility_words undone, on the device)."""
    entry = torch.arange(rows, device=words.device)
    word = words.index_select(-1, entry // WORD_BITS)
    return ((word >> (entry % WORD_BITS)) & 1).bool()


class StepInputs:
    """A bucket's buffers, all int64, as views of one flat device tensor: a step fills them with one copy."""

    def __init__(self, batch: int, rows: int, num_layers: int, num_kv_heads: int, device: torch.device):
        self.batch, self.rows = batch, rows
        self.shapes = {
            "token_ids": (batch, rows),
            "positions": (batch, rows),
            "places": (batch,),  # each sequence's place in the device block tables
            "block_rows": (batch,),  # its rows that are real (1 for plain decoding)
            "lengths": (num_layers, batch, num_kv_heads),  # entries after this step's
        }
        if rows > 1:
            self.shapes["visibility"] = (batch, rows, -(-rows // WORD_BITS))
        self.packed_size = sum(math.prod(shape) for shape in self.shapes.values())
        self.packed = torch.zeros(self.packed_size, dtype=torch.int64, device=device)
        self.buffers = self.split(self.packed)

    def split(self, flat):
        """The named fields of a packed step (numpy or torch), as views shaped like the buffers."""
        fields, start = {}, 0
        for name, shape in self.shapes.items():
            size = math.prod(shape)
            fields[name] = flat[start : start + size].reshape(shape)
            start += size
        return fields

    def fill(self, packed: torch.Tensor) -> None:
        self.packed.copy_(packed[: self.packed_size])


class StaticAttention:
    """The model's attention callable for one bucket. Made before the forward, it works out every layer's
    write slots at once (padding rows write to the scratch slot) and records their positions; each layer
    then stores its new entries and attends over the pool through the device block tables."""

    def __init__(self, pool: KVPool, tables: torch.Tensor, inputs: StepInputs, width: int, sliding_window: int | None,
                 scratch_slot: int):
        """`tables` [layers, places, kv_heads, columns]; `width`: the columns read (all of them in a graph,
        where the kernel stops at the lengths)."""
        self.pool, self.inputs, self.window = pool, inputs, sliding_window or 0
        self.tables = tables[..., :width]
        buffers = inputs.buffers
        self.visibility = unpack_visibility(buffers["visibility"], inputs.rows) if inputs.rows > 1 else None
        self.slots = self._slots(buffers["places"], buffers["lengths"], buffers["block_rows"], scratch_slot)
        positions = buffers["positions"].reshape(1, -1, 1)
        pool.positions.view(-1)[self.slots] = positions.expand_as(self.slots)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool, buffers, batch, rows = self.pool, self.inputs.buffers, self.inputs.batch, self.inputs.rows
        pool.store(self.slots[layer], k, v)
        tables, lengths, places = self.tables[layer], buffers["lengths"][layer], buffers["places"]
        scale = q.shape[-1] ** -0.5
        if self.visibility is None:
            return paged_decode_attention(q, pool.keys, pool.values, tables, lengths, scale, self.window, places=places)
        out = paged_decode_attention(q.view(batch, rows, *q.shape[1:]), pool.keys, pool.values, tables, lengths, scale,
                                     block_visibility=self.visibility, block_rows=buffers["block_rows"], places=places)
        return out.view(q.shape)

    def _slots(self, places: torch.Tensor, lengths: torch.Tensor, block_rows: torch.Tensor, scratch_slot: int) -> torch.Tensor:
        """Flat pool slots [layers, batch * rows, kv_heads] of this step's entries: a sequence's block is the
        last block_rows entries of each of its (layer, KV head)."""
        layers, batch, kv_heads = lengths.shape
        rows, block_size = self.inputs.rows, self.pool.block_size
        row = torch.arange(rows, device=lengths.device)
        block_rows = block_rows.view(batch, 1, 1)
        real = row < block_rows  # [batch, 1, rows]
        entry = torch.where(real, lengths.unsqueeze(-1) + row - block_rows, 0)  # [layers, batch, kv_heads, rows]
        layer_index = torch.arange(layers, device=lengths.device).view(-1, 1, 1, 1)
        head_index = torch.arange(kv_heads, device=lengths.device).view(1, 1, -1, 1)
        blocks = self.tables[layer_index, places.view(1, -1, 1, 1), head_index, entry // block_size].long()
        slots = torch.where(real, blocks * block_size + entry % block_size, scratch_slot)
        return slots.transpose(2, 3).reshape(layers, batch * rows, kv_heads)
