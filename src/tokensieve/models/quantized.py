"""Weights kept in GGUF's 32-weight blocks, multiplied by a native kernel when few rows are processed,
and read row by row for an embedding lookup.

Decoding reads every weight once per token; reading 4- or 8-bit blocks instead of float32 cuts the
bytes per token by 4-6x. The blocks decode to exactly the float32 values the dense copy holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# GGUF block layouts: bytes per 32 weights, and our kernel's code for each type
BLOCK_LAYOUTS = {"Q4_0": (18, 0), "Q4_1": (20, 1), "Q8_0": (34, 2)}
MAX_KERNEL_ROWS = 24  # above this, the dense float32 matmul (compute-bound) is faster


@dataclass
class QuantizedWeight:
    kind: int  # 0: Q4_0, 1: Q4_1, 2: Q8_0
    blocks: torch.Tensor  # uint8 [out_features, in_features / 32 * bytes of quants per block]
    scales: torch.Tensor  # float32 [out_features, in_features / 32]
    mins: torch.Tensor  # float32 [out_features, in_features / 32] (Q4_1), else empty
    max_rows = MAX_KERNEL_ROWS

    @classmethod
    def from_gguf(cls, raw: np.ndarray, type_name: str, row_order: np.ndarray | None = None) -> "QuantizedWeight":
        """raw: the tensor's bytes [rows, bytes per row] as stored in the file."""
        block_bytes, kind = BLOCK_LAYOUTS[type_name]
        blocks = raw.reshape(raw.shape[0], -1, block_bytes)
        if row_order is not None:
            blocks = blocks[row_order]
        as_float = lambda b: torch.from_numpy(np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32))
        scales = as_float(blocks[..., 0:2])
        has_min = type_name == "Q4_1"
        mins = as_float(blocks[..., 2:4]) if has_min else torch.empty(0)
        quants = blocks[..., 4 if has_min else 2 :].reshape(blocks.shape[0], -1)
        return cls(kind, torch.from_numpy(np.ascontiguousarray(quants)), scales, mins)

    @staticmethod
    def concat(parts: list["QuantizedWeight"]) -> "QuantizedWeight | None":
        """Stack row-wise (fused projections; a single part is itself); None when the parts use different block types."""
        if len(parts) == 1:
            return parts[0]
        if len({p.kind for p in parts}) != 1:
            return None
        mins = torch.cat([p.mins for p in parts]) if parts[0].mins.numel() else torch.empty(0)
        return QuantizedWeight(
            parts[0].kind, torch.cat([p.blocks for p in parts]), torch.cat([p.scales for p in parts]), mins
        )

    def matmul(self, x: torch.Tensor, kernels) -> torch.Tensor:
        return kernels.quantized_matmul(x, self.blocks, self.scales, self.mins, self.kind)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The float32 weights of rows `ids` [*ids.shape, in_features], the values GGUF's dequantization
        gives (an embedding lookup that reads 4-8 bits per weight and keeps no float32 copy)."""
        quants = self.blocks[ids].view(*ids.shape, self.scales.shape[1], -1)
        return dequantize_blocks(self.kind, quants, self.scales[ids], self.mins[ids] if self.kind == 1 else None)


def dequantize_blocks(kind: int, quants: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> torch.Tensor:
    """float32 weights [..., blocks * 32] from GGUF's quant bytes [..., blocks, 32 (Q8_0) or 16 (Q4)] and
    the blocks' scales (and Q4_1 mins) [..., blocks], computed as GGUF's dequantization computes them."""
    if kind == 2:  # Q8_0: int8 quants
        weights = quants.view(torch.int8).float()
    else:  # Q4: a byte's low nibble is weight i of its block, its high nibble weight i + 16
        weights = torch.cat([quants & 15, quants >> 4], dim=-1).float()
        if kind == 0:
            weights = weights - 8
    weights = weights * scales.unsqueeze(-1)
    if kind == 1:
        weights = weights + mins.unsqueeze(-1)
    return weights.flatten(-2)
