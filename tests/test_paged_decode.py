"""Paged decode attention: the plain-PyTorch version and the Triton kernels (through Triton's interpreter
on the CPU) against a naive per-head softmax, and the PyTorch version without host syncs."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import no_host_sync

from tokensieve.engine.paged_decode import paged_decode_attention, paged_decode_attention_torch

BLOCK = 16
MAX_BLOCKS = 5
# lengths per (seq, KV head), cycled: one entry, exact block multiples, partial blocks, the whole table
LENGTHS = [1, 16, 37, 80, 5, 32, 17, 64, 49]


def make_case(seqs, kv_heads, group, dim, pool_dtype, q_dtype=torch.float32, seed=0):
    """A pool with each (seq, KV head)'s blocks scattered in it, its table padded with block 0."""
    generator = torch.Generator().manual_seed(seed)
    num_blocks = seqs * kv_heads * MAX_BLOCKS + 1
    keys = torch.randn(num_blocks, dim, BLOCK, generator=generator).to(pool_dtype)
    values = torch.randn(num_blocks, BLOCK, dim, generator=generator).to(pool_dtype)
    q = torch.randn(seqs, kv_heads * group, dim, generator=generator).to(q_dtype)
    lengths = torch.tensor([LENGTHS[(i + seed) % len(LENGTHS)] for i in range(seqs * kv_heads)]).view(seqs, kv_heads)
    order = torch.randperm(num_blocks - 1, generator=generator) + 1
    block_tables = torch.zeros(seqs, kv_heads, MAX_BLOCKS, dtype=torch.int64)
    for flat, length in enumerate(lengths.view(-1).tolist()):
        used = -(-length // BLOCK)
        block_tables.view(-1, MAX_BLOCKS)[flat, :used] = order[flat * MAX_BLOCKS: flat * MAX_BLOCKS + used]
    return q, keys, values, block_tables, lengths


def naive_attention(q, keys, values, block_tables, lengths, scale, window=0):
    """Per sequence and query head: that KV head's entries read block by block, then a plain softmax."""
    seqs, heads, dim = q.shape
    kv_heads = block_tables.shape[1]
    out = torch.empty(seqs, heads, dim)
    for seq in range(seqs):
        for head in range(heads):
            kv_head = head // (heads // kv_heads)
            length = int(lengths[seq, kv_head])
            blocks = block_tables[seq, kv_head]
            head_keys = torch.cat([keys[block].T for block in blocks]).float()[:length]
            head_values = torch.cat([values[block] for block in blocks]).float()[:length]
            first = max(0, length - window) if window > 0 else 0
            logits = head_keys[first:] @ q[seq, head].float() * scale
            out[seq, head] = torch.softmax(logits, 0) @ head_values[first:]
    return out


@pytest.mark.parametrize("window", [0, 20])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("dim", [64, 48])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.float16])
def test_the_torch_version_matches_a_naive_softmax(pool_dtype, dim, group, window):
    q, keys, values, tables, lengths = make_case(3, 3, group, dim, pool_dtype, seed=group)
    expected = naive_attention(q, keys, values, tables, lengths, dim**-0.5, window)
    out = paged_decode_attention_torch(q, keys, values, tables, lengths, dim**-0.5, window)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_the_torch_version_returns_q_dtype_and_fills_out():
    q, keys, values, tables, lengths = make_case(2, 2, 2, 64, torch.bfloat16, q_dtype=torch.bfloat16)
    expected = naive_attention(q, keys, values, tables, lengths, 0.125)
    out = torch.empty_like(q)
    returned = paged_decode_attention(q, keys, values, tables, lengths, 0.125, out=out)
    assert returned is out and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)


SOME_LENGTHS = torch.tensor([3, 4])


@pytest.mark.parametrize("read_on_host", [
    lambda t: t.sum().item(), lambda t: int(t[0]), lambda t: bool(t[0] > 1), lambda t: t.tolist(), lambda t: t.numpy(),
    lambda t: t.nonzero(), lambda t: t[t > 3], lambda t: t.masked_select(t > 3), lambda t: t.index_put_((t > 3,), t[:1]),
])
def test_the_checker_catches_host_syncs(read_on_host):
    with pytest.raises(AssertionError, match="host sync"), no_host_sync():
        read_on_host(SOME_LENGTHS.clone())


def test_the_checker_lets_static_shapes_pass():
    with no_host_sync():
        SOME_LENGTHS.clone().masked_fill_(SOME_LENGTHS > 3, 0)[torch.tensor([1, 0])].sum()


@pytest.mark.parametrize("window", [0, 20])
def test_the_torch_version_makes_no_host_sync(window):
    q, keys, values, tables, lengths = make_case(2, 3, 3, 48, torch.float16)
    with no_host_sync():
        paged_decode_attention_torch(q, keys, values, tables, lengths, 0.1, window)


@pytest.fixture(scope="module")
def triton_decode():
    """(tokensieve.engine.triton_decode, the device to test it on): real launches on CUDA; elsewhere its
    kernels decorated for Triton's interpreter (TRITON_INTERPRET is read when @triton.jit runs), decorated
    afresh afterwards."""
    if torch.cuda.is_available():
        pytest.importorskip("triton")
        yield importlib.import_module("tokensieve.engine.triton_decode"), torch.device("cuda")
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        triton = pytest.importorskip("triton")
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        if isinstance(triton.language.standard.zeros, JITFunction):
            # triton was imported before (torch imports it too): its own helpers (tl.zeros, tl.max, ...) are
            # compiled-only, so interpret them when called
            def interpreted_call(self, *args, **kwargs):
                return InterpretedFunction(self.fn)(*args, **kwargs)

            patch.setattr(JITFunction, "__call__", interpreted_call)
        module = importlib.reload(importlib.import_module("tokensieve.engine.triton_decode"))
        yield module, torch.device("cpu")
    importlib.reload(module)


@pytest.mark.parametrize(
    "dtypes, dim, group, window, num_splits",
    [
        ((torch.float32, torch.float32), 64, 1, 0, 1),
        ((torch.float32, torch.float32), 48, 3, 20, 2),
        ((torch.float32, torch.float32), 64, 4, 0, 8),  # more splits than most heads have blocks
        ((torch.float32, torch.float16), 64, 3, 0, 3),
        ((torch.float16, torch.float16), 64, 4, 20, 1),
        ((torch.float16, torch.float16), 48, 1, 0, 5),
    ],
)
def test_the_triton_kernels_match_a_naive_softmax(triton_decode, dtypes, dim, group, window, num_splits):
    module, device = triton_decode
    q_dtype, pool_dtype = dtypes
    case = make_case(3, 2, group, dim, pool_dtype, q_dtype, seed=num_splits)
    expected = naive_attention(*case, dim**-0.5, window)
    out = module.paged_decode_attention_triton(*(t.to(device) for t in case), dim**-0.5, window, num_splits=num_splits)
    assert out.dtype == q_dtype and not out.isnan().any()
    tolerance = 1e-5 if q_dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.cpu().float(), expected, atol=tolerance, rtol=tolerance)


def test_the_triton_kernels_write_into_out_and_read_strided_q(triton_decode):
    module, device = triton_decode
    q, keys, values, tables, lengths = make_case(2, 2, 2, 64, torch.float32)
    expected = naive_attention(q, keys, values, tables, lengths, 0.125)
    q, keys, values, tables, lengths = (t.to(device) for t in (q, keys, values, tables, lengths))
    fused = torch.cat([q, torch.randn_like(q)], dim=1)[:, : q.shape[1]]  # q as a slice of a wider projection
    out = torch.empty_like(q)
    returned = module.paged_decode_attention_triton(fused, keys, values, tables, lengths, 0.125, out=out, num_splits=2)
    assert returned is out
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


def test_num_splits_fill_the_gpu_within_bounds(triton_decode):
    choose_num_splits = triton_decode[0].choose_num_splits
    assert choose_num_splits(seqs=1, kv_heads=8, max_blocks=512, multiprocessors=132) == 33
    assert choose_num_splits(seqs=1, kv_heads=1, max_blocks=512, multiprocessors=132) == 64
    assert choose_num_splits(seqs=1, kv_heads=1, max_blocks=3, multiprocessors=132) == 3
    assert choose_num_splits(seqs=256, kv_heads=8, max_blocks=512, multiprocessors=132) == 1
