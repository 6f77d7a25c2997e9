"""GGUF blocks repacked for the int8-activation kernel (kernels/int8_matmul.cpp).

With `activations="int8"` every row entering a quantized linear is rounded to int8 per 32-entry block
(scale max|x| / 127, as llama.cpp quantizes activations for its Q4/Q8 dot products), and each block's
dot product with the weights is an exact integer sum. The weights keep their values; what moves is
the activations, by up to half a step of their block (0.1-1.2% relative error per matmul on the default model, benchmarks/scripts/int8_error.py).

The kernel wants 16 outputs side by side: for every group of 16 output rows and block of 32 inputs,
vector j (64 bytes) holds in lane c output c's weights 4j .. 4j+3. A Q4 byte keeps GGUF's pairing
(low nibble weight i, high nibble weight i + 16), so 4 vectors of bytes give all 8 vectors of
weights. Q8_0 weights are stored plus 128, as unsigned bytes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .quantized import QuantizedWeight, dequantize_blocks

LANES = 16


def _grouped(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[N, ...] -> [groups, 16, ...], the missing output rows zero (with scale 0 they add nothing)."""
    padding = [0, 0] * (t.dim() - 1) + [0, rows - t.shape[0]]
    return F.pad(t, padding).reshape(rows // LANES, LANES, *t.shape[1:])


@dataclass
class Int8Weight:
    kind: int  # 0: Q4_0, 1: Q4_1, 2: Q8_0
    packed: torch.Tensor  # uint8 [groups, in_features / 32, 512 (Q8_0) or 256 bytes]
    scales: torch.Tensor  # float16 [groups, in_features / 32, 16]
    mins: torch.Tensor  # float16 [groups, in_features / 32, 16] (Q4_1), else empty
    out_features: int
    max_rows = sys.maxsize  # every forward: rows are rounded alike whatever their number

    @classmethod
    def pack(cls, weight: QuantizedWeight) -> "Int8Weight":
        n, num_blocks = weight.scales.shape
        rows = -(-n // LANES) * LANES
        quants = weight.blocks.reshape(n, num_blocks, -1)  # [N, blocks, 32 bytes or 16 nibble pairs]
        if weight.kind == 2:  # Q8_0: int8 weights, stored plus 128
            quants = (quants.view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        # [groups, 16 outputs, blocks, vectors, 4 bytes] -> [groups, blocks, vectors, 16 outputs, 4 bytes]
        grouped = _grouped(quants, rows).reshape(rows // LANES, LANES, num_blocks, -1, 4)
        packed = grouped.permute(0, 2, 3, 1, 4).reshape(rows // LANES, num_blocks, -1).contiguous()
        # scales and mins in float16, as GGUF stores them: exact, and a sixth fewer bytes to read per token
        per_lane = lambda t: _grouped(t, rows).transpose(1, 2).half().contiguous()
        mins = per_lane(weight.mins) if weight.mins.numel() else torch.empty(0)
        return cls(weight.kind, packed, per_lane(weight.scales), mins, n)

    def matmul(self, x: torch.Tensor, kernels) -> torch.Tensor:
        return kernels.int8_matmul(x, self.packed, self.scales, self.mins, self.kind, self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The float32 weights of output rows `ids` [*ids.shape, in_features], read back from the packed
        layout: a tied embedding is looked up in the output head's blocks, with no copy of its own."""
        flat = ids.reshape(-1)
        group, lane = flat // LANES, flat % LANES
        groups, blocks, _ = self.packed.shape
        # [n, blocks, vectors, 4 bytes]: this output's bytes of every vector, in GGUF's order
        quants = self.packed.view(groups, blocks, -1, LANES, 4)[group, :, :, lane, :].reshape(len(flat), blocks, -1)
        if self.kind == 2:
            quants = quants ^ 128  # stored plus 128: the int8's own bits again
        mins = self.mins[group, :, lane].float() if self.kind == 1 else None
        return dequantize_blocks(self.kind, quants, self.scales[group, :, lane].float(), mins).view(*ids.shape, -1)
