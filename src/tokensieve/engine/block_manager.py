"""Hands out fixed-size KV blocks to sequences and accounts for them exactly. No tensors here.

With prefix caching, full blocks of computed tokens are cached (see prefix_cache.py): a table holds
its cached prefix by reference, and a block nobody holds stays cached, counted as free, until the
pool needs it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .block_table import BlockTable
from .prefix_cache import CachedBlock, PrefixCache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_layers: int, num_kv_heads: int, prefix_caching: bool = False,
                 on_release: Callable[[list[int]], None] | None = None):
        self.num_blocks = num_blocks
        self.on_release = on_release  # told the ids of blocks a table hands back (a quantized pool frees their staging)
        self.block_size = block_size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.blocks_per_group = num_layers * num_kv_heads  # physical blocks behind one logical block
        # free blocks: those handed back (reused first: their pages are in memory already), then the
        # never used ones from _next_unused up, which cost nothing until written (no list of them either)
        self._released: list[int] = []
        self._next_unused = 0
        self._live: dict[int, BlockTable] = {}  # tables by id(), to count stored entries
        self.prefix_cache = PrefixCache() if prefix_caching else None
        self.peak_used_blocks = 0  # most blocks handed out at once since the last reset_peak()

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds: never used, or cached and evictable."""
        evictable = self.prefix_cache.num_evictable if self.prefix_cache else 0
        return len(self._released) + self.num_blocks - self._next_unused + evictable * self.blocks_per_group

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_stored_entries(self) -> int:
        """Entries held by sequences; a shared cached block counts once."""
        private = sum(int(table.lengths.sum()) - len(table.cached) * table.lengths.size * self.block_size
                      for table in self._live.values())
        shared = self.prefix_cache.num_held * self.blocks_per_group * self.block_size if self.prefix_cache else 0
        return private + shared

    def new_table(self) -> BlockTable:
        table = BlockTable(self.num_layers, self.num_kv_heads, self.block_size)
        self._live[id(table)] = table
        return table

    def blocks_needed(self, table: BlockTable, num_new: int) -> int:
        return 0 if table.fits(num_new) else int(table.blocks_needed(num_new).sum())

    def can_append(self, table: BlockTable, num_new: int) -> bool:
        return self.blocks_needed(table, num_new) <= self.num_free_blocks

    def reserve(self, table: BlockTable, num_new: int) -> None:
        """Give `table` enough blocks to append `num_new` entries to every (layer, head)."""
        if table.fits(num_new):
            return
        needed = table.blocks_needed(num_new)
        total = int(needed.sum())
        if total > self.num_free_blocks:
            raise MemoryError(f"need {total} KV blocks, {self.num_free_blocks} free")
        while total > len(self._released) + self.num_blocks - self._next_unused:  # the least recently used
            self._released.extend(self.prefix_cache.evict())  # cached blocks make room
        if total:
            reused = min(total, len(self._released))
            unused = total - reused
            block_ids = list(range(self._next_unused + unused - 1, self._next_unused - 1, -1))
            block_ids += self._released[len(self._released) - reused :]
            del self._released[len(self._released) - reused :]
            self._next_unused += unused
            table.add_blocks(needed, block_ids)
            self._update_peak()

    def _update_peak(self) -> None:
        self.peak_used_blocks = max(self.peak_used_blocks, self.num_used_blocks)

    def reset_peak(self) -> None:
        self.peak_used_blocks = self.num_used_blocks

    # ---- prefix caching -------------------------------------------------------------------------
    def cached_prefix(self, keys: list[int], token_ids: list[int]) -> list[CachedBlock]:
        """The cached blocks matching the first blocks of `token_ids` (keys: their block keys)."""
        return self.prefix_cache.lookup(keys, token_ids, self.block_size) if self.prefix_cache else []

    def share(self, table: BlockTable, blocks: list[CachedBlock]) -> None:
        """Start an empty `table` with the cached `blocks` as its prefix (their entries count as stored)."""
        if not blocks:
            return
        assert not table.num_blocks.any(), "a cached prefix goes only into an empty table"
        self.prefix_cache.acquire(blocks)
        table.add_blocks(np.full_like(table.num_blocks, len(blocks)), np.stack([b.block_ids for b in blocks], -1).ravel())
        table.claim(len(blocks) * self.block_size)  # the table is empty: their entries are its first
        table.cached = list(blocks)
        self._update_peak()

    def cache_full_blocks(self, table: BlockTable, keys: list[int], token_ids: list[int]) -> None:
        """Cache the table's full blocks of computed entries beyond its cached prefix (keys: their block
        keys). A table whose entries a KV policy chose per head has nothing to cache."""
        if self.prefix_cache is None:
            return
        num_full = min(len(keys), int(table.lengths.flat[0]) // self.block_size)
        if num_full <= len(table.cached) or not table.layers_aligned():  # the first test is the cheap one
            return
        size = self.block_size
        for index in range(len(table.cached), num_full):
            parent = keys[index - 1] if index else None
            tokens = tuple(token_ids[index * size : (index + 1) * size])
            block = self.prefix_cache.add(keys[index], parent, tokens, table.blocks[:, :, index])
            if block is None:  # another sequence computed the same block first: share that one, free this copy
                block = self.prefix_cache.lookup([keys[index]], list(tokens), size, parent)
                if not block:  # a key collision: the rest stays private
                    return
                block = block[0]
                self.prefix_cache.acquire([block])
                self._released.extend(table.blocks[:, :, index].ravel().tolist())
                table.replace_column(index, block.block_ids)
            table.cached.append(block)

    # ---- shrinking and freeing ---------------------------------------------------------------------
    def compact(self, table: BlockTable, keep) -> tuple:
        """Keep only the entries `keep` marks (see BlockTable.compact); freed blocks return to the pool.
        Returns the (source, destination) slots whose contents the caller must move."""
        assert not table.cached, "a KV policy never compresses a table that shares cached blocks"
        source, destination, freed = table.compact(keep)
        self._hand_back(freed)
        return source, destination

    def keep_appended(self, table: BlockTable, num_appended: int, kept) -> tuple:
        """Keep only the appended entries at offsets `kept` (see BlockTable.keep_appended); freed
        blocks return to the pool. Returns the (source, destination) slots the caller must move."""
        source, destination, freed = table.keep_appended(num_appended, kept)
        self._hand_back(freed)
        return source, destination

    def release(self, table: BlockTable) -> None:
        """Return every block of `table` to the pool (its cached prefix to the cache); the table stays usable (empty)."""
        self._hand_back(table.private_block_ids())
        if table.cached:
            self.prefix_cache.release(table.cached)
        table.clear()

    def _hand_back(self, block_ids: list[int]) -> None:
        self._released.extend(block_ids)
        if self.on_release is not None and len(block_ids):
            self.on_release(block_ids)

    def drop(self, table: BlockTable) -> None:
        """Release `table` and forget it for good."""
        self.release(table)
        self._live.pop(id(table), None)
