"""Hands out fixed-size KV blocks to sequences and accounts for them exactly. No tensors here."""

from __future__ import annotations

from .block_table import BlockTable


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_layers: int, num_kv_heads: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._live: dict[int, BlockTable] = {}  # tables by id(), to count stored entries
        self.peak_used_blocks = 0  # most blocks handed out at once since the last reset_peak()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_stored_entries(self) -> int:
        return int(sum(table.lengths.sum() for table in self._live.values()))

    def new_table(self) -> BlockTable:
        table = BlockTable(self.num_layers, self.num_kv_heads, self.block_size)
        self._live[id(table)] = table
        return table

    def blocks_needed(self, table: BlockTable, num_new: int) -> int:
        return int(table.blocks_needed(num_new).sum())

    def can_append(self, table: BlockTable, num_new: int) -> bool:
        return self.blocks_needed(table, num_new) <= len(self._free)

    def reserve(self, table: BlockTable, num_new: int) -> None:
        """Give `table` enough blocks to append `num_new` entries to every (layer, head)."""
        needed = table.blocks_needed(num_new)
        total = int(needed.sum())
        if total > len(self._free):
            raise MemoryError(f"need {total} KV blocks, {len(self._free)} free")
        if total:
            block_ids = self._free[-total:]
            del self._free[-total:]
            table.add_blocks(needed, block_ids)
            self.peak_used_blocks = max(self.peak_used_blocks, self.num_used_blocks)

    def reset_peak(self) -> None:
        self.peak_used_blocks = self.num_used_blocks

    def compact(self, table: BlockTable, keep) -> tuple:
        """Keep only the entries `keep` marks (see BlockTable.compact); freed blocks return to the pool.
        Returns the (source, destination) slots whose contents the caller must move."""
        source, destination, freed = table.compact(keep)
        self._free.extend(freed)
        return source, destination

    def keep_appended(self, table: BlockTable, num_appended: int, kept) -> tuple:
        """Keep only the appended entries at offsets `kept` (see BlockTable.keep_appended); freed
        blocks return to the pool. Returns the (source, destination) slots the caller must move."""
        source, destination, freed = table.keep_appended(num_appended, kept)
        self._free.extend(freed)
        return source, destination

    def release(self, table: BlockTable) -> None:
        """Return every block of `table` to the pool; the table stays usable (empty)."""
        self._free.extend(table.all_block_ids())
        table.clear()

    def drop(self, table: BlockTable) -> None:
        """Release `table` and forget it for good."""
        self.release(table)
        self._live.pop(id(table), None)
