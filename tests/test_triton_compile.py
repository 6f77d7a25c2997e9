"""Every Triton kernel compiles for the GPUs the engine targets (sm_90: H100, H200) at the shapes it
launches, without spilling registers to local memory: what Triton's interpreter on the CPU does not
check. Triton compiles ahead of time here with its own LLVM and ptxas; no GPU is needed."""

from __future__ import annotations

import importlib
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
                 torch.int32: "*i32", torch.uint8: "*u8"}
FLOATS = {"scale", "eps"}


@pytest.fixture(scope="module")
def modules():
    """The kernel modules, decorated for compiling (tests before may have reloaded them for the interpreter
    and back: conftest.triton_modules)."""
    if os.environ.get("TRITON_INTERPRET"):
        pytest.skip("TRITON_INTERPRET is set: the kernels are decorated for the interpreter")
    names = ("tokensieve.engine.triton_decode", "tokensieve.kernels.triton_ops")
    modules = [importlib.import_module(name) for name in names]
    for module, kernel in zip(modules, ("_split_kernel", "_rms_norm_kernel")):
        assert isinstance(getattr(module, kernel), triton.runtime.jit.JITFunction), f"{module.__name__} left interpreted"
    return modules


def resource_usage(kernel, pointers: dict, constants: dict, num_warps: int = 4) -> str:
    """cuobjdump's resource line of `kernel` compiled for sm_90: `pointers` {argument: tensor dtype, or None
    for an absent pointer}, `constants` {argument: value}; other arguments are int32 (floats where named so)."""
    signature = {}
    constants = dict(constants)
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers and pointers[name] is None:
            signature[name], constants[name] = "constexpr", None
        elif name in pointers:
            signature[name] = POINTER_TYPES[pointers[name]]
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=TARGET, options={"num_warps": num_warps})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.is_file():
        pytest.skip("this Triton has no cuobjdump to read the compiled kernel's resources with")
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        dump = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                              check=True)
    return next(line for line in dump.stdout.splitlines() if "REG:" in line)


def assert_no_spills(usage: str) -> None:
    assert "STACK:0 " in usage and "LOCAL:0 " in usage, usage


# (model dtype, head_dim, group, rows, tables read through places, one split): Llama-3.2-1B decoding and
# verifying a 128-row block in bfloat16, an 8B's head_dim, the float32 of the correctness checks, a table per
# sequence, a batch that needs no split
ATTENTION_CASES = [(torch.bfloat16, 64, 4, 1, True, False), (torch.bfloat16, 128, 4, 1, True, False),
                   (torch.bfloat16, 64, 4, 128, True, False), (torch.bfloat16, 128, 4, 128, True, False),
                   (torch.float32, 64, 4, 17, True, False), (torch.float16, 64, 1, 1, False, False),
                   (torch.bfloat16, 64, 4, 1, True, True)]


@pytest.mark.parametrize("dtype, head_dim, group, rows, places, one_split", ATTENTION_CASES)
def test_the_decode_attention_kernels_compile_without_spills(modules, dtype, head_dim, group, rows, places, one_split):
    decode = modules[0]
    tree, tile_rows = rows > 1, decode.tile_rows_for(rows, group)
    pointers = dict(q_ptr=dtype, keys_ptr=dtype, values_ptr=dtype, tables_ptr=torch.int32,
                    places_ptr=torch.int64 if places else None,
                    lengths_ptr=torch.int32, visibility_ptr=torch.uint8 if tree else None,
                    block_rows_ptr=torch.int32 if tree else None, partial_ptr=None if one_split else torch.float32,
                    lse_ptr=None if one_split else torch.float32, out_ptr=dtype)
    dim_pad = max(16, triton.next_power_of_2(head_dim))
    constants = dict(ROWS=rows, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=16, TILE_ROWS=tile_rows,
                     ROW_TILES=-(-rows * group // tile_rows), DIM_PAD=dim_pad, BLOCK_PAD=16, TREE=tree, PLACES=places,
                     ONE_SPLIT=one_split)
    assert_no_spills(resource_usage(decode._split_kernel, pointers, constants, decode.warps_for(tile_rows)))
    if not one_split:
        combine = dict(partial_ptr=torch.float32, lse_ptr=torch.float32, out_ptr=dtype)
        assert_no_spills(resource_usage(decode._combine_kernel, combine,
                                        dict(ROWS=rows, HEAD_DIM=head_dim, SPLITS_PAD=64, DIM_PAD=dim_pad)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_layer_ops_compile_without_spills(modules, dtype):
    ops = modules[1]
    assert_no_spills(resource_usage(ops._rms_norm_kernel, dict(x_ptr=dtype, weight_ptr=dtype, out_ptr=dtype),
                                    dict(BLOCK=4096)))
    assert_no_spills(resource_usage(ops._rotary_kernel, dict(x_ptr=dtype, cos_ptr=dtype, sin_ptr=dtype, out_ptr=dtype),
                                    dict(HALF=64, HEADS_PAD=64, HALF_PAD=64)))
    assert_no_spills(resource_usage(ops._silu_mul_kernel, dict(gate_up_ptr=dtype, out_ptr=dtype),
                                    dict(BLOCK=ops.SILU_BLOCK)))
    store = dict(key_pool_ptr=dtype, value_pool_ptr=dtype, slots_ptr=torch.int64, keys_ptr=dtype, values_ptr=dtype)
    assert_no_spills(resource_usage(ops._store_kv_kernel, store, dict(BLOCK_SIZE=16, DIM=128, DIM_PAD=128)))
