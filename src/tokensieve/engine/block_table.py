"""One sequence's KV layout: for every (layer, KV head) its own list of blocks and its own length.

Heads may hold different numbers of entries (a KV policy can keep fewer in one head), so each
(layer, head) pair owns whole blocks that are freed for real when its entries go.
"""

from __future__ import annotations

import numpy as np


class BlockTable:
    def __init__(self, num_layers: int, num_kv_heads: int, block_size: int):
        self.block_size = block_size
        self.blocks = np.zeros((num_layers, num_kv_heads, 4), dtype=np.int64)  # grows by doubling
        self.num_blocks = np.zeros((num_layers, num_kv_heads), dtype=np.int64)
        self.lengths = np.zeros((num_layers, num_kv_heads), dtype=np.int64)  # stored entries
        self.compacted = False  # a policy chose entries per (layer, head): entry i may differ between layers
        self.cached: list = []  # CachedBlocks behind the first logical blocks: shared, never written
        self.version = 0  # changes whenever blocks are added or dropped, or entries move (not on appends)
        # the lowest column whose block ids changed since the static decode step last copied the table to
        # the device (static_decode.py); a column only changes when a block is written into it
        self.changed_from = 0
        self._room = 0  # free entries in the blocks the fullest (layer, head) holds; None: work it out again

    def fits(self, num_new: int) -> bool:
        """Whether every (layer, head) has room for `num_new` more entries in the blocks it holds (most
        decode steps: then no block is needed, which this knows without array work)."""
        if self._room is None:
            self._room = int((self.num_blocks * self.block_size - self.lengths).min())
        return num_new <= self._room

    def blocks_needed(self, num_new: int) -> np.ndarray:
        """Blocks each (layer, head) must gain to store `num_new` more entries."""
        required = -(-(self.lengths + num_new) // self.block_size)
        return np.maximum(required - self.num_blocks, 0)

    def add_blocks(self, needed: np.ndarray, block_ids: list[int]) -> None:
        """Append `needed[l, h]` of `block_ids` (in order) to each (layer, head)."""
        layer_idx, head_idx = np.nonzero(needed)
        counts = needed[layer_idx, head_idx]
        new_total = self.num_blocks + needed
        self.changed_from = min(self.changed_from, int(self.num_blocks.min()))
        if new_total.max() > self.blocks.shape[2]:
            capacity = max(int(new_total.max()), 2 * self.blocks.shape[2])
            grown = np.zeros(self.blocks.shape[:2] + (capacity,), dtype=np.int64)
            grown[:, :, : self.blocks.shape[2]] = self.blocks
            self.blocks = grown
        pair = np.repeat(np.arange(len(counts)), counts)
        offset_in_pair = np.arange(len(pair)) - np.repeat(np.cumsum(counts) - counts, counts)
        slot = self.num_blocks[layer_idx, head_idx][pair] + offset_in_pair
        self.blocks[layer_idx[pair], head_idx[pair], slot] = np.asarray(block_ids, dtype=np.int64)
        self.num_blocks = new_total
        self.version += 1
        self._room = None

    def replace_column(self, index: int, block_ids: np.ndarray) -> None:
        """Put other blocks [layers, heads] (holding the same entries) behind column `index`."""
        self.blocks[:, :, index] = block_ids
        self.changed_from = min(self.changed_from, index)

    def append_slots(self, num_new: int) -> np.ndarray:
        """Claim the next `num_new` entries of every (layer, head); returns their flat slots [layers, num_new, heads]."""
        entry = self.lengths[:, :, None] + np.arange(num_new)
        block = np.take_along_axis(self.blocks, entry // self.block_size, axis=2)
        self.claim(num_new)
        return (block * self.block_size + entry % self.block_size).transpose(0, 2, 1)

    def claim(self, num_new: int) -> None:
        """Claim the next `num_new` entries of every (layer, head), whose slots someone else works out
        (the static decode step does, on the device)."""
        self.lengths += num_new
        if self._room is not None:
            self._room -= num_new

    def slots(self, layer: np.ndarray, head: np.ndarray, entry: np.ndarray) -> np.ndarray:
        """Flat pool slots of the given entries."""
        return self.blocks[layer, head, entry // self.block_size] * self.block_size + entry % self.block_size

    def compact(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Keep only the entries where `keep` [layers, heads, width] is set, moved to the front of their
        (layer, head) in the same order. Returns the (source, destination) slots of the entries that
        move and the block ids no longer needed."""
        if keep.shape[-1] < self.lengths.max():
            raise ValueError(f"keep mask covers {keep.shape[-1]} entries but a head stores {self.lengths.max()}")
        layer, head, entry = np.nonzero(keep)
        counts = keep.sum(-1)
        first_of_pair = (np.cumsum(counts) - counts.ravel()).reshape(counts.shape)
        new_entry = np.arange(len(entry)) - first_of_pair[layer, head]
        moved = new_entry != entry
        layer, head = layer[moved], head[moved]
        source, destination = self.slots(layer, head, entry[moved]), self.slots(layer, head, new_entry[moved])
        freed = self._shorten(counts.astype(np.int64))
        self.compacted = True
        return source, destination, freed

    def keep_appended(self, num_appended: int, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Of the last `num_appended` entries of every (layer, head), keep those at offsets `kept`
        (ascending), moved up behind the entries before them; the same in every (layer, head).
        Returns the (source, destination) slots to move and the block ids no longer needed."""
        start = self.lengths - num_appended
        moved = np.nonzero(kept != np.arange(len(kept)))[0]
        source = destination = np.empty(0, dtype=np.int64)
        if len(moved):  # else the path is the block's first entries, already in place
            layer, head = np.indices(start.shape)
            layer, head, first = layer[..., None], head[..., None], start[..., None]
            source = self.slots(layer, head, first + kept[moved]).ravel()
            destination = self.slots(layer, head, first + moved).ravel()
        return source, destination, self._shorten(start + len(kept))

    def _shorten(self, lengths: np.ndarray) -> list[int]:
        """Set the new (shorter) lengths; returns the ids of the blocks no longer needed."""
        new_num_blocks = -(-lengths // self.block_size)
        index = np.arange(self.blocks.shape[2])
        freed = self.blocks[(index >= new_num_blocks[..., None]) & (index < self.num_blocks[..., None])].tolist()
        self.lengths, self.num_blocks = lengths, new_num_blocks
        self.version += 1
        self._room = None
        return freed

    def layers_aligned(self) -> bool:
        """True while every (layer, head) holds the same entries in the same places (nothing evicted)."""
        return not self.compacted and bool((self.lengths == self.lengths.flat[0]).all())

    def private_block_ids(self) -> list[int]:
        """Ids of the blocks this table alone holds (all but the cached prefix)."""
        index = np.arange(self.blocks.shape[2])
        keep = (index >= len(self.cached)) & (index < self.num_blocks[:, :, None])
        return self.blocks[keep].tolist()

    def clear(self) -> None:
        self.num_blocks[:] = 0
        self.lengths[:] = 0
        self.compacted = False
        self.cached = []
        self.version += 1
        self._room = 0

    def padded_blocks(self, width: int) -> np.ndarray:
        """Block ids [layers, heads, width], padded with block 0 (masked out by the lengths)."""
        out = np.zeros(self.blocks.shape[:2] + (width,), dtype=np.int64)
        used = min(width, self.blocks.shape[2])
        out[:, :, :used] = self.blocks[:, :, :used]
        return out
