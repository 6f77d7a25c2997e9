"""Block tables of the running sequences, kept on the device for the static decode step.

Each sequence decoding through the static step holds a place (a row of the device tables) while it
runs. A step sends only the columns whose block ids changed since the device last saw them
(BlockTable.changed_from): one column per (layer, KV head) every block_size tokens, or all of them for
a sequence new to its place. A place is taken back from a sequence that is not in the step (finished,
preempted or prefilling) when a newcomer needs one.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from .sequence import Sequence

UP_TO_DATE = sys.maxsize  # a BlockTable.changed_from once the device holds every column


class DeviceBlockTables:
    def __init__(self, num_layers: int, num_kv_heads: int, num_places: int, columns: int, scratch_block: int, device):
        """`columns`: the most blocks one (layer, KV head) holds; the place after the last, and every unused
        column, point at `scratch_block` (where padding rows write and read)."""
        self.num_places, self.num_kv_heads, self.columns = num_places, num_kv_heads, columns
        self.padding_place = num_places
        self.tables = torch.full((num_layers, num_places + 1, num_kv_heads, columns), scratch_block, dtype=torch.int32,
                                 device=device)
        self._owners: list[Sequence | None] = [None] * num_places
        self._place_of: dict[int, int] = {}  # by id() of a sequence in _owners (which keeps it alive)
        self._layer_place = np.arange(num_layers)[:, None, None] * (num_places + 1)
        self._head = np.arange(num_kv_heads)[None, :, None]

    def places(self, seqs: list[Sequence]) -> list[int]:
        """Each sequence's place: its own, or a new one (then all its columns are sent)."""
        taken = {self._place_of[id(seq)] for seq in seqs if id(seq) in self._place_of}
        places = []
        for seq in seqs:
            place = self._place_of.get(id(seq))
            if place is None:
                free = [p for p in range(self.num_places) if p not in taken]
                place = next((p for p in free if self._owners[p] is None), free[0])
                if self._owners[place] is not None:
                    del self._place_of[id(self._owners[place])]
                self._owners[place], self._place_of[id(seq)] = seq, place
                seq.block_table.changed_from = 0
                taken.add(place)
            places.append(place)
        return places

    def changes(self, seq: Sequence, place: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The flat indices into the device tables, and the block ids, of the sequence's changed columns
        (None: none changed); from now on the device counts as holding them."""
        table = seq.block_table
        if table.changed_from == UP_TO_DATE:
            return None
        used = int(table.num_blocks.max())
        if used > self.columns:  # its columns would spill into the next (place, head)'s
            raise ValueError(f"a block table of {used} columns does not fit the device tables' {self.columns}")
        first = min(table.changed_from, used)
        table.changed_from = UP_TO_DATE
        columns = np.arange(first, used)[None, None, :]
        indices = ((self._layer_place + place) * self.num_kv_heads + self._head) * self.columns + columns
        return indices.ravel(), table.blocks[:, :, first:used].ravel()

    def apply(self, indices: torch.Tensor, block_ids: torch.Tensor) -> None:
        """Write the changed entries (device tensors)."""
        self.tables.view(-1)[indices] = block_ids.to(torch.int32)
