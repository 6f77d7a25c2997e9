"""Prefix caching: full KV blocks keyed by their tokens, shared between sequences. No tensors here.

A sequence's i-th logical block (tokens i*block_size..) is one physical block per (layer, KV head);
its key chains the parent block's key with its token ids, so equal keys mean equal prefixes (a hit is
still confirmed by comparing the token ids). A cached block is reference-counted by the block tables
that hold it; at zero references it keeps its key and waits in an LRU queue, where a later request (a
chat's next turn, a preempted request resuming) can find it, until the pool needs the memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


def extend_block_keys(keys: list[int], token_ids: list[int], block_size: int) -> None:
    """Append to `keys` the key of every full block of `token_ids` it does not have yet."""
    for index in range(len(keys), len(token_ids) // block_size):
        parent = keys[-1] if keys else None
        keys.append(hash((parent, tuple(token_ids[index * block_size : (index + 1) * block_size]))))


@dataclass(eq=False)
class CachedBlock:
    key: int
    parent: int | None
    token_ids: tuple[int, ...]
    block_ids: np.ndarray  # [layers, kv heads]: the physical blocks holding these tokens' entries
    refs: int = 1


class PrefixCache:
    def __init__(self):
        self._blocks: dict[int, CachedBlock] = {}
        self._evictable: OrderedDict[int, CachedBlock] = OrderedDict()  # refs == 0, oldest first
        self.num_queried_tokens = 0  # tokens looked up at admission (cumulative)
        self.num_hit_tokens = 0  # tokens found

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def num_held(self) -> int:
        """Cached blocks some table holds."""
        return len(self._blocks) - len(self._evictable)

    def lookup(self, keys: list[int], token_ids: list[int], block_size: int, parent: int | None = None) -> list[CachedBlock]:
        """The longest run of cached blocks matching the first len(keys) blocks of `token_ids` (which follow
        the block keyed `parent`)."""
        found = []
        for index, key in enumerate(keys):
            block = self._blocks.get(key)
            tokens = tuple(token_ids[index * block_size : (index + 1) * block_size])
            if block is None or block.parent != parent or block.token_ids != tokens:
                break
            found.append(block)
            parent = key
        return found

    def acquire(self, blocks: list[CachedBlock]) -> None:
        for block in blocks:
            if block.refs == 0:
                del self._evictable[block.key]
            block.refs += 1

    def release(self, blocks: list[CachedBlock]) -> None:
        """Drop one reference to each; blocks nobody holds queue for eviction, deepest first."""
        for block in reversed(blocks):
            block.refs -= 1
            if block.refs == 0:
                self._evictable[block.key] = block

    def add(self, key: int, parent: int | None, token_ids: tuple[int, ...], block_ids: np.ndarray) -> CachedBlock | None:
        """Cache a block just computed (held by its table); None if another copy already has the key."""
        if key in self._blocks:
            return None
        block = CachedBlock(key, parent, token_ids, block_ids.copy())
        self._blocks[key] = block
        return block

    def evict(self) -> list[int]:
        """Forget the least recently released block; returns its physical block ids."""
        key, block = self._evictable.popitem(last=False)
        del self._blocks[key]
        return block.block_ids.ravel().tolist()

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens
