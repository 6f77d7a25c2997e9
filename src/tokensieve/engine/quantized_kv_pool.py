"""A KV pool of int8 or int4 blocks (KIVI): full blocks hold codes, the blocks being filled stay in float.

A block is quantized once all its entries are written: its keys per channel over the block's entries,
its values per entry in groups (kv_quantization.py). Until then it lives in a float32 staging block
(KIVI's residual), so the newest entries of every (layer, KV head) are exact. A write into a block
that is already quantized (compaction filling a hole, an append after a draft's rejected entries
left the block part-full) brings it back to staging first. The decode kernels read each block where
it lies: codes dequantized 16 entries at a time into registers, or staging as it is.
"""

from __future__ import annotations

import numpy as np
import torch

from .block_table import BlockTable
from .kv_pool import KVPool, _lazy_zeros
from .kv_quantization import SCALE_DTYPE, dequantize, quantize

INITIAL_STAGING_BLOCKS = 1024  # staging grows by doubling past this


class QuantizedKVPool(KVPool):
    def __init__(
        self, num_blocks: int, block_size: int, head_dim: int, bits: int, device: torch.device, kernels=None,
        key_bounds: bool = False, value_group: int = 32,
    ):
        self.bits = bits
        self.value_group = value_group if head_dim % value_group == 0 else head_dim
        self.dtype = torch.uint8  # the codes' (read_blocks gives float32)
        byte_entries, byte_dims = block_size * bits // 8, head_dim * bits // 8
        self.key_codes = _lazy_zeros((num_blocks, head_dim, byte_entries), torch.uint8, device)
        self.key_scale = _lazy_zeros((num_blocks, head_dim, 1), SCALE_DTYPE, device)
        self.key_zero = _lazy_zeros((num_blocks, head_dim, 1), SCALE_DTYPE, device)
        groups = head_dim // self.value_group
        self.value_codes = _lazy_zeros((num_blocks, block_size, byte_dims), torch.uint8, device)
        self.value_scale = _lazy_zeros((num_blocks, block_size, groups), SCALE_DTYPE, device)
        self.value_zero = _lazy_zeros((num_blocks, block_size, groups), SCALE_DTYPE, device)
        native = block_size == 16 and head_dim % 16 == 0
        self._init_bookkeeping(num_blocks, block_size, head_dim, device, kernels if native else None, key_bounds, SCALE_DTYPE)
        # a block's staging block, or -1 (numpy for the bookkeeping of every write, the tensor for the kernels)
        self._staging_of = np.full(num_blocks, -1, dtype=np.int64)
        self.staging_of = torch.from_numpy(self._staging_of)
        self.staging = KVPool(INITIAL_STAGING_BLOCKS, block_size, head_dim, torch.float32, device, kernels)
        self._free_staging: list[int] = list(range(INITIAL_STAGING_BLOCKS - 1, -1, -1))  # lowest first: pages reused
        self.staging_high_water = 0  # most staging blocks held at once: the staging pages ever written
        # blocks just handed back, their staging blocks still readable: compaction frees blocks before the move
        # that reads their entries; freed at the next write
        self._released_of = np.full(num_blocks, -1, dtype=np.int64)
        self._released: list[int] = []

    @property
    def num_staged(self) -> int:
        """Staging blocks holding the entries of blocks being filled."""
        return self.staging.num_blocks - len(self._free_staging) - len(self._released)

    # ---- writing ------------------------------------------------------------------------------------
    def store(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write keys and values [tokens, kv_heads, dim] at flat slots [tokens, kv_heads]; the blocks whose
        last entry this writes are full (blocks fill in order) and are quantized."""
        self._free_released()
        if self.key_min is not None:
            self._bound_new_keys(slots.reshape(-1), keys)
        flat = slots.reshape(-1).numpy()
        blocks, in_block = np.divmod(flat, self.block_size)
        self._write(flat, keys, values, fresh=blocks[in_block == 0])
        filled = blocks[in_block == self.block_size - 1]
        if len(filled):
            self._quantize(filled)

    def move(self, source: torch.Tensor, destination: torch.Tensor, table: BlockTable) -> None:
        """Copy the entries at flat slots `source` to `destination` (keys, values and positions)."""
        keys, values = (self._read_slots(name, source) for name in ("keys", "values"))
        self._free_released()
        flat_positions = self.positions.view(-1)
        flat_positions[destination] = flat_positions[source]
        self.overwrite(destination, keys, values, table)

    def overwrite(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: BlockTable) -> None:
        """Replace entries through staging; the written blocks that are full in `table` (all but a (layer,
        head)'s last when it is part-full) are quantized again."""
        self._write(slots.numpy(), keys.unsqueeze(1), values.unsqueeze(1), fresh=np.empty(0, dtype=np.int64))
        if self.key_min is not None:
            self._widen_bounds(slots, keys.to(SCALE_DTYPE))
        written = np.unique(slots.numpy() // self.block_size)
        self._quantize(written[~np.isin(written, self._part_full_blocks(table))])

    def _part_full_blocks(self, table: BlockTable) -> np.ndarray:
        """The last block of each (layer, head) of `table` whose entries do not fill it."""
        last = np.minimum(table.lengths // self.block_size, table.blocks.shape[2] - 1)
        blocks = np.take_along_axis(table.blocks, last[..., None], -1)[..., 0]
        return blocks[table.lengths % self.block_size != 0]

    def _write(self, slots: np.ndarray, keys: torch.Tensor, values: torch.Tensor, fresh: np.ndarray) -> None:
        """Write float entries [len(slots), kv_heads or 1, dim] at flat `slots` through staging; the blocks in
        `fresh` start empty."""
        blocks = slots // self.block_size
        staged = self._staging_of[blocks]
        if (staged < 0).any():
            self._stage(np.unique(blocks[staged < 0]), fresh)
            staged = self._staging_of[blocks]
        staged_slots = torch.from_numpy(staged * self.block_size + slots % self.block_size)
        self.staging.store(staged_slots.view(keys.shape[:2]), keys, values)

    def _stage(self, blocks: np.ndarray, fresh: np.ndarray) -> None:
        """Give each of `blocks` (unique, none staged) a staging block holding its entries so far (none if fresh)."""
        if len(blocks) > len(self._free_staging):
            self._grow_staging(self.num_staged + len(blocks))
        staged = np.array([self._free_staging.pop() for _ in range(len(blocks))], dtype=np.int64)
        self._staging_of[blocks] = staged
        self.staging_high_water = max(self.staging_high_water, self.num_staged)
        holding = ~np.isin(blocks, fresh)
        if holding.any():
            targets, sources = torch.from_numpy(staged[holding]), torch.from_numpy(blocks[holding])
            for name in ("keys", "values"):
                self.staging.entry_major(name)[targets] = self._dequantized(name, sources)

    def _grow_staging(self, needed: int) -> None:
        old = self.staging
        size = max(needed, 2 * old.num_blocks)
        self.staging = KVPool(size, self.block_size, self.head_dim, torch.float32, self.device, old.kernels)
        self.staging.keys[: old.num_blocks] = old.keys
        self.staging.values[: old.num_blocks] = old.values
        self._free_staging[:0] = range(size - 1, old.num_blocks - 1, -1)

    def _quantize(self, blocks: np.ndarray) -> None:
        """Quantize those of `blocks` that are in staging, and free their staging blocks."""
        blocks = np.unique(blocks[self._staging_of[blocks] >= 0])
        if not len(blocks):
            return
        staged, ids = torch.from_numpy(self._staging_of[blocks]), torch.from_numpy(blocks)
        for source, codes, scale, zero, group in (
            (self.staging.keys, self.key_codes, self.key_scale, self.key_zero, self.block_size),
            (self.staging.values, self.value_codes, self.value_scale, self.value_zero, self.value_group),
        ):
            if self.kernels is not None:
                self.kernels.quantize_into(source, staged, codes, scale, zero, ids, self.bits)
            else:
                codes[ids], scale[ids], zero[ids] = quantize(source[staged], self.bits, group)
        self._unstage(blocks)

    def _unstage(self, blocks: np.ndarray) -> None:
        self._free_staging.extend(self._staging_of[blocks].tolist())
        self._staging_of[blocks] = -1

    def release(self, block_ids: list[int]) -> None:
        """Blocks handed back to the pool: their staging blocks are free, once the move that may follow (of
        entries they held, into kept blocks) has read them."""
        self._free_released()
        blocks = np.asarray(block_ids, dtype=np.int64)
        blocks = blocks[self._staging_of[blocks] >= 0]
        self._released_of[blocks] = self._staging_of[blocks]
        self._released = blocks.tolist()
        self._staging_of[blocks] = -1

    def _free_released(self) -> None:
        if self._released:
            self._free_staging.extend(self._released_of[self._released].tolist())
            self._released_of[self._released] = -1
            self._released = []

    # ---- reading ------------------------------------------------------------------------------------
    @property
    def read_dtype(self) -> torch.dtype:
        return torch.float32

    def _dequantized(self, name: str, blocks: torch.Tensor) -> torch.Tensor:
        """The quantized contents of `blocks` as float32 [blocks, block_size, dim]."""
        if name == "keys":
            return dequantize(self.key_codes[blocks], self.key_scale[blocks], self.key_zero[blocks], self.bits).transpose(1, 2)
        return dequantize(self.value_codes[blocks], self.value_scale[blocks], self.value_zero[blocks], self.bits)

    def read_blocks(self, name: str, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        staged = self._staging_of[ids.numpy()]
        if self._released:
            staged = np.where(staged >= 0, staged, self._released_of[ids.numpy()])
        staged = torch.from_numpy(staged)
        in_staging = staged >= 0
        read = out if out is not None else torch.empty((len(ids), self.block_size, self.head_dim))
        read[in_staging] = self.staging.entry_major(name)[staged[in_staging]]
        read[~in_staging] = self._dequantized(name, ids[~in_staging])
        return read

    def _read_slots(self, name: str, slots: torch.Tensor) -> torch.Tensor:
        """Entries at flat `slots` as float32 [len(slots), dim]."""
        blocks, index = torch.unique(slots // self.block_size, return_inverse=True)
        return self.read_blocks(name, blocks)[index, slots % self.block_size]

    def paged_scores(self, q, block_tables, lengths, scale, row_of_slot, visibility, block_rows) -> torch.Tensor:
        return self.kernels.paged_scores_quantized(
            q, self.key_codes, self.key_scale, self.key_zero, self.staging_of, self.staging.keys, self.bits,
            block_tables, lengths, scale, row_of_slot, visibility, block_rows,
        )

    def paged_softmax_values(self, scores, block_tables, lengths, row_of_slot, block_rows, num_rows) -> torch.Tensor:
        return self.kernels.paged_softmax_values_quantized(
            scores, self.value_codes, self.value_scale, self.value_zero, self.staging_of, self.staging.values, self.bits,
            block_tables, lengths, row_of_slot, block_rows, num_rows,
        )

    # ---- accounting ---------------------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        return self.block_bytes(self.block_size, self.head_dim, self.bits, self.key_min is not None, self.value_group)

    def allocated_bytes(self, used_blocks: int, peak: bool = False) -> int:
        """Handed-out blocks, and the staging blocks holding the entries of blocks being filled (at the peak:
        the most staging ever held, whose pages stay written)."""
        staged = self.staging_high_water if peak else self.num_staged
        return used_blocks * self.bytes_per_block + staged * self.staging.bytes_per_block

    @staticmethod
    def block_bytes(block_size: int, head_dim: int, bits: int, key_bounds: bool = False, value_group: int = 32) -> int:
        """Codes, the keys' scale and zero per dimension, the values' per entry and group, and key bounds."""
        scale_bytes = torch.empty((), dtype=SCALE_DTYPE).element_size()
        groups = head_dim // value_group if head_dim % value_group == 0 else 1
        codes = 2 * block_size * head_dim * bits // 8
        return codes + 2 * scale_bytes * (head_dim + block_size * groups + key_bounds * head_dim)
