"""KIVI's quantization of KV blocks: keys per channel, values per token in groups.

A key block [dim, entries] gets one scale and zero per dimension over its entries (keys have outlier
channels, so a channel shares its range), a value block [entries, dim] one per entry and group of
`group` dimensions. Codes are unsigned and asymmetric: x ~ code * scale + zero, code in 0..2^bits - 1,
scale and zero in float16. Int4 codes are packed two to a byte along the last axis, the even element
in the low nibble (the layout the decode kernels read).
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16


def quantize(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., n] -> (codes uint8 [..., n * bits / 8], scale and zero [..., n / group]), each group of `group`
    consecutive elements of the last axis sharing a scale and zero (its min)."""
    levels = 2**bits - 1
    grouped = x.float().unflatten(-1, (-1, group))
    low, high = grouped.amin(-1), grouped.amax(-1)
    scale, zero = ((high - low) / levels).to(SCALE_DTYPE), low.to(SCALE_DTYPE)
    # the codes are taken against the float16 scale and zero the reader will use
    step = scale.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    codes = ((grouped - zero.float().unsqueeze(-1)) / step).round_().clamp_(0, levels).to(torch.uint8).flatten(-2)
    return _pack(codes, bits), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 values [..., n] of `quantize`'s output (into `out` when given)."""
    unpacked = _unpack(codes, bits).unflatten(-1, (scale.shape[-1], -1))
    values = torch.addcmul(zero.float().unsqueeze(-1), unpacked.float(), scale.float().unsqueeze(-1)).flatten(-2)
    return values if out is None else out.copy_(values)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return codes if bits == 8 else codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return codes if bits == 8 else torch.stack((codes & 15, codes >> 4), -1).flatten(-2)
