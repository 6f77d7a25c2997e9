"""The Triton layer ops (CUDA's rms_norm, rotary, silu_mul, store_kv) against the PyTorch code they replace,
through Triton's interpreter on the CPU: in half precision equal but for a rare last-bit difference (the
order of a float32 sum), in float32 close. The interpreter rounds to bfloat16 toward zero (CUDA to nearest,
as PyTorch does), so there bfloat16 is held to its tolerance and float16 checks where the rounding goes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import triton_modules

from tokensieve.engine.kv_pool import KVPool
from tokensieve.models.llama import RMSNorm
from tokensieve.models.rope import RotaryEmbedding, apply_rotary


@pytest.fixture(scope="module")
def triton_ops():
    with triton_modules("tokensieve.kernels.triton_ops") as ((module,), device):
        yield module, device


HALF = [torch.float32, torch.float16, torch.bfloat16]


def assert_same(out, expected):
    """Close: in float32 at its tolerance; in half precision within two last bits, and equal in nearly every
    element (a missing or extra rounding step changes about one in four)."""
    assert out.dtype == expected.dtype and out.shape == expected.shape
    if expected.dtype == torch.bfloat16 and not out.is_cuda:  # truncation, in up to three steps
        torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
        return
    out = out.cpu()
    if expected.dtype == torch.float32:
        torch.testing.assert_close(out, expected)
        return
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=2 * torch.finfo(expected.dtype).eps)
    assert (out == expected).float().mean() > 0.98


def random(*shape, dtype, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_rms_norm_matches_the_model_on_rows_and_on_strided_heads(triton_ops, dtype):
    module, device = triton_ops
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = random(96, dtype=torch.float32, seed=1, scale=0.3) + 1
    norm = norm.to(dtype)
    rows = random(5, 96, dtype=dtype, scale=3.0)
    assert_same(module.rms_norm(rows.to(device), norm.weight.to(device), 1e-5), norm(rows))
    fused = random(4, 7, 96, dtype=dtype, seed=2)  # q of a fused projection: heads 0..4 of 7, a strided view
    heads = fused[:, :5]
    assert_same(module.rms_norm(fused.to(device)[:, :5], norm.weight.to(device), 1e-5), norm(heads))


@pytest.mark.parametrize("dtype", HALF)
def test_rotary_matches_the_model_on_a_strided_view(triton_ops, dtype):
    module, device = triton_ops
    rope = RotaryEmbedding(32, 512, 10000.0, None)
    cos, sin = rope(torch.tensor([0, 7, 300, 511, 12, 3]), dtype)
    qkv = random(6, 9 * 32, dtype=dtype, scale=2.0)
    qk = qkv[:, : 7 * 32].view(6, 7, 32)  # the model rotates q and k heads of its fused projection in place
    out = module.rotary(qkv.to(device)[:, : 7 * 32].view(6, 7, 32), cos.to(device), sin.to(device))
    assert_same(out, apply_rotary(qk, cos, sin))


@pytest.mark.parametrize("dtype", HALF)
def test_silu_mul_matches_the_model(triton_ops, dtype):
    module, device = triton_ops
    gate_up = random(3, 2 * 1500, dtype=dtype, scale=4.0)  # 1500: two programs per row, the second partial
    gate, up = gate_up.chunk(2, dim=-1)
    assert_same(module.silu_mul(gate_up.to(device)), F.silu(gate) * up)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)])
def test_store_kv_writes_where_the_pool_does(triton_ops, dtypes):
    module, device = triton_ops
    model_dtype, pool_dtype = dtypes
    expected = KVPool(12, 16, 32, pool_dtype, torch.device("cpu"))
    slots = torch.tensor([[5, 37], [16, 191], [100, 0]])  # [tokens, kv_heads]: block edges, the pool's last entry
    qkv = random(3, 4 * 32, dtype=model_dtype, scale=2.0)
    keys, values = qkv[:, 32:96].view(3, 2, 32), qkv[:, 64:].view(3, 2, 32)  # strided views, as the model's
    expected.store(slots, keys, values)
    key_pool, value_pool = torch.zeros_like(expected.keys).to(device), torch.zeros_like(expected.values).to(device)
    module.store_kv(key_pool, value_pool, slots.to(device), qkv.to(device)[:, 32:96].view(3, 2, 32),
                    qkv.to(device)[:, 64:].view(3, 2, 32))
    assert torch.equal(key_pool.cpu(), expected.keys) and torch.equal(value_pool.cpu(), expected.values)
