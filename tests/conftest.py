"""Shared fixtures. The real default model is loaded once per test session."""

from __future__ import annotations

import importlib
from contextlib import contextmanager

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def llm():
    from tokensieve import LLM

    return LLM("smollm2-135m", dtype="float32", activations="float32")  # the reference mode


@pytest.fixture(scope="session")
def hf_model():
    from tokensieve.bench.hf_baseline import load_hf_model

    return load_hf_model("smollm2-135m", torch.float32)


@pytest.fixture
def fresh_llm(llm):
    """An engine of its own (small default pool) over the shared weights."""
    return llm.with_options(kv_cache_bytes=256 * 1024**2)


def assert_pool_empty(llm) -> None:
    engine = llm.engine
    assert engine.block_manager.num_used_blocks == 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.kv_memory()["allocated_bytes"] == 0
    assert not engine.has_unfinished()


class NoHostSync(TorchDispatchMode):
    """Fails on any op that reads a tensor's value on the host (.item(), int(), bool()) or whose output shape
    depends on values (nonzero, masked_select, boolean indexing): what CUDA graph capture forbids.
    Use it with NoValuesToPython, which catches .tolist() and .numpy() (they call no aten op)."""

    FORBIDDEN = {torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.masked_select}
    INDEXING = {torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_, torch.ops.aten._index_put_impl_}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.FORBIDDEN or (func.overloadpacket in self.INDEXING and boolean_index(args[1])):
            raise AssertionError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))


class NoValuesToPython(TorchFunctionMode):
    """Fails on .tolist() and .numpy(), which hand a tensor's values to Python."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.numpy):
            raise AssertionError(f"host sync: {func.__name__}")
        return func(*args, **(kwargs or {}))


def boolean_index(indices) -> bool:
    return any(index is not None and index.dtype in (torch.bool, torch.uint8) for index in indices)


@contextmanager
def no_host_sync():
    """Within it, any read of a tensor's values by the host raises AssertionError("host sync: ...")."""
    with NoValuesToPython(), NoHostSync():
        yield


@contextmanager
def triton_modules(*names: str):
    """(the modules `names` of Triton kernels, the device to test them on): real launches on CUDA; elsewhere
    their kernels decorated for Triton's interpreter (TRITON_INTERPRET is read when @triton.jit runs), and
    decorated afresh afterwards (all together: one module reloaded while another still had it set would
    stay interpreted)."""
    if torch.cuda.is_available():
        pytest.importorskip("triton")
        yield [importlib.import_module(name) for name in names], torch.device("cuda")
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
        modules = [importlib.reload(importlib.import_module(name)) for name in names]
        yield modules, torch.device("cpu")
    for module in modules:
        importlib.reload(module)
