"""Retrieval heads vs streaming heads: the probe (deterministic, cached), the budgets it sets, and
RazorAttention's compensation entry."""

import json

import pytest
import torch

from tokensieve import KVPolicyConfig, SamplingParams
from tokensieve.engine.head_probe import PROBE_TOKENS, HeadProbe
from tokensieve.errors import ConfigError
from tokensieve.policies import retrieval_budgets

from conftest import assert_pool_empty

HEADS = 0.15


def test_retrieval_budgets_keep_the_total_and_give_retrieval_heads_everything():
    budgets = torch.full((2, 3), 10)
    lengths = torch.tensor([[40, 40, 40], [40, 40, 40]])
    retrieval = torch.tensor([[False, True, False], [False, False, False]])
    out = retrieval_budgets(budgets, lengths, retrieval)
    assert out[0, 1] == 40 and (out[~retrieval] == (60 - 40) // 5).all()
    assert int(out.sum()) <= int(budgets.sum())


def test_retrieval_heads_is_a_share():
    with pytest.raises(ConfigError, match="retrieval_heads"):
        KVPolicyConfig("streaming_llm", budget=8, retrieval_heads=1.0)
    with pytest.raises(ConfigError, match="allocation"):
        KVPolicyConfig("snapkv", budget=8, retrieval_heads=0.2, allocation="adaptive")


def test_the_probe_finds_induction_heads_deterministically_and_caches_them(llm, tmp_path, monkeypatch):
    engine = llm.with_options(kv_policy=KVPolicyConfig("streaming_llm", budget=64)).engine
    probe = HeadProbe(engine.runner, engine.block_manager, engine.model.config.vocab_size)
    first, second = probe.measure(), probe.measure()
    assert torch.equal(first, second) and first.shape == (30, 3)
    # a random token repeated is found again only by heads that look back to its first copy: a few heads
    # score far above the rest (attention spread evenly over 2 x 256 entries would give about 2 / 384)
    assert float(first.max()) > 0.2 and float(first.median()) < 0.01
    assert engine.block_manager.num_used_blocks == 0  # the probe's sequences are gone
    cache_file = tmp_path / "heads.json"
    assert torch.equal(probe.scores(cache_file), first)
    assert json.loads(cache_file.read_text())["retrieval"] == first.tolist()
    monkeypatch.setattr(HeadProbe, "measure", lambda self: pytest.fail("the cached scores are read, not measured again"))
    assert torch.equal(probe.scores(cache_file), first)


def test_retrieval_heads_keep_everything_and_the_others_a_compensation_entry(llm):
    """One prefill chunk, compressed once: each streaming head keeps its budget plus one entry at the first
    evicted position holding the mean of the evicted keys and values."""
    ids = llm.encode("The harbour town kept its old lighthouse by the grey sea. " * 30)[:400]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    full = llm.with_options(kv_policy=KVPolicyConfig("streaming_llm", budget=10_000)).engine  # nothing evicted
    razor_llm = llm.with_options(kv_policy=KVPolicyConfig("streaming_llm", budget=64, retrieval_heads=HEADS))
    razor = razor_llm.engine
    stored = {}
    for name, engine in (("full", full), ("razor", razor)):
        request = engine.add_request(ids, params)
        seq = engine.sequence(request)
        while seq.num_processed < len(ids):
            engine.step()
        table = seq.block_table
        blocks = torch.from_numpy(table.padded_blocks(int(table.num_blocks.max())))
        stored[name] = (table.lengths.copy(), blocks, engine)
        while engine.has_unfinished():
            engine.step()
        if name == "razor":
            lengths, retrieval = torch.from_numpy(stored[name][0]), razor.compressor.retrieval
            assert (lengths[retrieval] == len(ids)).all()
            budget = (30 * 3 * 64 - len(ids) * int(retrieval.sum())) // int((~retrieval).sum())
            assert (lengths[~retrieval] == max(1, budget) + 1).all()
            layer, head = (~retrieval).nonzero()[0].tolist()
            keys = razor.pool.read_blocks("keys", blocks[layer, head]).flatten(0, 1)
            positions = razor.pool.positions[blocks[layer, head]].flatten()
            compensation = int((positions[: int(lengths[layer, head])] == 4).nonzero())  # after the 4 sinks
    _, full_blocks, _ = stored["full"]
    full_keys = full.pool.read_blocks("keys", full_blocks[layer, head]).flatten(0, 1)[: len(ids)]
    evicted = torch.arange(4, len(ids) - max(1, budget) + 4)  # neither a sink nor in the recent window
    assert torch.allclose(keys[compensation], full_keys[evicted].mean(0), atol=1e-4)
    assert_pool_empty(razor_llm)


def test_with_nothing_evicted_retrieval_heads_reproduce_the_full_cache(llm):
    prompt = {"prompt_token_ids": llm.encode("The harbour town kept its old lighthouse. " * 20)}
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    full = llm.generate(prompt, params)[0].token_ids
    razor = llm.with_options(kv_policy=KVPolicyConfig("snapkv", budget=10_000, retrieval_heads=HEADS))
    assert razor.generate(prompt, params)[0].token_ids == full
