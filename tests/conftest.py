"""Shared fixtures. The real default model is loaded once per test session."""

from __future__ import annotations

import pytest
import torch

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
