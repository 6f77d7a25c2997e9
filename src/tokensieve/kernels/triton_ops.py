"""The layer ops on CUDA as Triton kernels: rms_norm, rotary, silu_mul and store_kv, one launch each
where PyTorch launches three to eight (a small model's decode step on a GPU is bound by how many
kernels it launches, even inside a CUDA graph: METHODS.md section 5).

They take the arguments of the native CPU kernels of the same names (layer_ops.cpp) and any float
dtype. They do the arithmetic of the PyTorch code they replace (models/llama.py, models/rope.py,
engine/kv_pool.py), in float32, rounding to the model's dtype where that code rounds, so a bfloat16
model gives the same outputs whichever ran (up to the order of a float32 sum).

Run on CPU tensors with TRITON_INTERPRET=1 set before this module is imported (the tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SILU_BLOCK = 1024


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x rounded to `dtype` and back to float32 (a no-op for float32)."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, stride_outer, stride_inner, inner, dim, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    x = tl.load(x_ptr + (row // inner) * stride_outer + (row % inner) * stride_inner + cols, mask=ok, other=0.0)
    x = x.to(tl.float32)
    normalised = _rounded(x * tl.rsqrt(tl.sum(x * x, 0) / dim + eps), dtype)  # normalised in float32, then rounded
    weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * dim + cols, (normalised * weight).to(dtype), mask=ok)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_xt, stride_xh, stride_ct, stride_st, heads,
                   HALF: tl.constexpr, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    token = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    head, pair = tl.arange(0, HEADS_PAD)[:, None], tl.arange(0, HALF_PAD)[None, :]
    ok, pair_ok = (head < heads) & (pair < HALF), pair < HALF
    row = x_ptr + token * stride_xt + head * stride_xh
    first = tl.load(row + pair, mask=ok, other=0.0).to(tl.float32)
    second = tl.load(row + HALF + pair, mask=ok, other=0.0).to(tl.float32)
    cos_first = tl.load(cos_ptr + token * stride_ct + pair, mask=pair_ok, other=0.0).to(tl.float32)
    cos_second = tl.load(cos_ptr + token * stride_ct + HALF + pair, mask=pair_ok, other=0.0).to(tl.float32)
    sin_first = tl.load(sin_ptr + token * stride_st + pair, mask=pair_ok, other=0.0).to(tl.float32)
    sin_second = tl.load(sin_ptr + token * stride_st + HALF + pair, mask=pair_ok, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-second, first), each product rounded as PyTorch's
    out_first = _rounded(first * cos_first, dtype) + _rounded(-second * sin_first, dtype)
    out_second = _rounded(second * cos_second, dtype) + _rounded(first * sin_second, dtype)
    out = out_ptr + (token * heads + head) * (2 * HALF)
    tl.store(out + pair, out_first.to(dtype), mask=ok)
    tl.store(out + HALF + pair, out_second.to(dtype), mask=ok)


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, stride_row, width, BLOCK: tl.constexpr):
    row, part = tl.program_id(0), tl.program_id(1)
    dtype = out_ptr.dtype.element_ty
    cols = part * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    gate = tl.load(gate_up_ptr + row * stride_row + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_row + width + cols, mask=ok, other=0.0).to(tl.float32)
    silu = _rounded(gate / (1.0 + tl.exp(-gate)), dtype)
    tl.store(out_ptr + row * width + cols, (silu * up).to(dtype), mask=ok)


@triton.jit
def _store_kv_kernel(key_pool_ptr, value_pool_ptr, slots_ptr, keys_ptr, values_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, heads,
                     BLOCK_SIZE: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr):
    token, head = tl.program_id(0), tl.program_id(1)
    dtype = key_pool_ptr.dtype.element_ty
    slot = tl.load(slots_ptr + token * heads + head).to(tl.int64)
    block, entry = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    dims = tl.arange(0, DIM_PAD)
    ok = dims < DIM
    key = tl.load(keys_ptr + token * stride_kt + head * stride_kh + dims, mask=ok)
    value = tl.load(values_ptr + token * stride_vt + head * stride_vh + dims, mask=ok)
    tl.store(key_pool_ptr + block * (DIM * BLOCK_SIZE) + dims * BLOCK_SIZE + entry, key.to(dtype), mask=ok)
    tl.store(value_pool_ptr + block * (BLOCK_SIZE * DIM) + entry * DIM + dims, value.to(dtype), mask=ok)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim of x (rows [..., dim], or heads [tokens, heads, dim]
    with any strides but the last)."""
    shape, x = x.shape, _unit_stride(x)
    rows = x if x.dim() == 3 else x.reshape(-1, 1, shape[-1])
    outer, inner, dim = rows.shape
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    if outer * inner:
        _rms_norm_kernel[(outer * inner,)](rows, weight, out, rows.stride(0), rows.stride(1), inner, dim, eps,
                                           BLOCK=triton.next_power_of_2(dim))
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x [tokens, heads, dim] and cos, sin [tokens, 1, dim]."""
    x, cos, sin = _unit_stride(x), _unit_stride(cos), _unit_stride(sin)
    tokens, heads, dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if tokens:
        _rotary_kernel[(tokens,)](x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), heads,
                                  HALF=dim // 2, HEADS_PAD=triton.next_power_of_2(heads),
                                  HALF_PAD=triton.next_power_of_2(dim // 2))
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [rows, 2 * width] (gate first)."""
    gate_up = _unit_stride(gate_up)
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(width, SILU_BLOCK))](gate_up, out, gate_up.stride(0), width, BLOCK=SILU_BLOCK)
    return out


def store_kv(key_pool: torch.Tensor, value_pool: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor,
             values: torch.Tensor) -> None:
    """Write keys and values [tokens, kv_heads, dim] at flat slots [tokens, kv_heads] of the contiguous pools
    (keys [blocks, dim, block_size], values [blocks, block_size, dim]), in the pools' dtype."""
    keys, values, slots = _unit_stride(keys), _unit_stride(values), slots.reshape(keys.shape[:2]).contiguous()
    tokens, heads, dim = keys.shape
    if tokens:
        _store_kv_kernel[(tokens, heads)](key_pool, value_pool, slots, keys, values, keys.stride(0), keys.stride(1),
                                          values.stride(0), values.stride(1), heads, BLOCK_SIZE=key_pool.shape[-1],
                                          DIM=dim, DIM_PAD=triton.next_power_of_2(dim))
