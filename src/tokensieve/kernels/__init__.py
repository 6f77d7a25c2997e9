"""Native kernels, compiled on first use for the machine they run on (cached afterwards)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from ..cache import cache_root
from .build_lock import exclusive_build


KERNEL_DIR = Path(__file__).parent
SOURCES = (
    "kernels.h", "vector_math.h", "bindings.cpp", "qmatmul.cpp", "int8_matmul.cpp", "paged_attention.cpp", "top_tokens.cpp",
    "layer_ops.cpp", "block_selection.cpp", "kv_quantization.cpp",
)


def _build_dir() -> Path:
    """One build folder per kernel source text and torch version, so checkouts share identical builds."""
    digest = hashlib.sha256(torch.__version__.encode())
    for name in SOURCES:
        digest.update((KERNEL_DIR / name).read_bytes())
    path = cache_root() / "kernels" / digest.hexdigest()[:16]
    path.mkdir(parents=True, exist_ok=True)
    return path


def kernels_take(kernels, x) -> bool:
    """Whether there are native kernels and they can take tensor x: float32, on the CPU."""
    return kernels is not None and x.dtype == torch.float32 and x.device.type == "cpu"


_chosen_layer_ops: tuple | None = None  # (ops,) while chosen_layer_ops holds a choice


@contextlib.contextmanager
def chosen_layer_ops(ops):
    """Within it, `ops` runs the layer ops, whatever the tensors' device: triton_ops, the native kernels, or
    None for plain PyTorch. For comparing implementations on one device: the benchmarks that count or
    check them (benchmarks/scripts/decode_launches.py, gpu_check.py) and the tests."""
    global _chosen_layer_ops
    previous, _chosen_layer_ops = _chosen_layer_ops, (ops,)
    try:
        yield
    finally:
        _chosen_layer_ops = previous


def layer_ops(kernels, x: torch.Tensor):
    """What runs the layer ops (rms_norm, rotary, silu_mul, store_kv) on tensor x: the Triton kernels on
    CUDA, the native `kernels` (when given) for float32 on the CPU, else None (plain PyTorch); inside
    chosen_layer_ops, its choice."""
    if _chosen_layer_ops is not None:
        return _chosen_layer_ops[0]
    if x.is_cuda:
        from . import triton_ops

        return triton_ops
    return kernels if kernels_take(kernels, x) else None


def _import_built(library: Path):
    """The extension a finished build left (the folder is named by its sources), without asking torch's
    builder, which runs ninja to check it (0.2 s of every start); None if there is none or it is broken."""
    if not library.is_file():
        return None
    spec = importlib.util.spec_from_file_location("tokensieve_kernels", library)
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError:  # a link cut short: build again
        return None
    return module


@functools.cache
def native_kernels():
    """The compiled extension (quantized_matmul, int8_matmul, paged_scores, paged_softmax_values, top_tokens,
    rms_norm, rotary, silu_mul, store_kv), or None where it cannot be built; TOKENSIEVE_NO_KERNELS=1 turns it off."""
    if os.environ.get("TOKENSIEVE_NO_KERNELS"):
        return None
    try:
        build_dir = _build_dir()
        built = _import_built(build_dir / "tokensieve_kernels.so")
        if built is not None:
            return built
        from torch.utils.cpp_extension import load

        with exclusive_build(build_dir):
            first_build = not any(build_dir.glob("tokensieve_kernels*.so"))
            if first_build:
                print("tokensieve: building the CPU kernels for this machine (once; a minute or two)...",
                      file=sys.stderr, flush=True)
            started = time.perf_counter()
            kernels = load(
                name="tokensieve_kernels",
                sources=[str(KERNEL_DIR / name) for name in SOURCES if name.endswith(".cpp")],
                extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=False,
            )
            if first_build:
                print(f"tokensieve: CPU kernels built in {time.perf_counter() - started:.0f} s, cached in {build_dir}",
                      file=sys.stderr, flush=True)
            return kernels
    except Exception as exc:  # no compiler, no ninja, unsupported platform: fall back to plain PyTorch
        warnings.warn(f"tokensieve: native kernels unavailable, using plain PyTorch ({exc})", stacklevel=2)
        return None
