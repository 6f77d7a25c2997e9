"""Speculative decoding on the real default model: lossless greedy and sampled output, KV
bookkeeping after rejected branches, batching, KV policies and the switches."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tokensieve import SamplingParams
from tokensieve.config import KVPolicyConfig, SpeculativeConfig
from tokensieve.speculative import speculator as speculator_module
from tokensieve.speculative.tree import ROOT

from conftest import assert_pool_empty

QUESTIONS = Path(__file__).parents[1] / "src/tokensieve/bench/data/spec_bench/question.jsonl"
DRAFTER_SETS = [("lookup",), ("recycling",), ("lookahead",), ("lookup", "recycling", "lookahead")]


def spec_bench_prompts(categories: list[str]) -> list[list[dict]]:
    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines()]
    first = {}
    for q in questions:
        first.setdefault(q["category"], q)
    return [[{"role": "user", "content": first[c]["turns"][0]}] for c in categories]


@pytest.fixture(scope="module")
def prompts():
    return spec_bench_prompts(["summarization", "rag", "coding", "writing"])


@pytest.fixture(scope="module")
def plain_greedy(llm, prompts):
    params = SamplingParams(max_tokens=96, temperature=0, ignore_eos=True)
    return [out.token_ids for out in llm.with_options().generate(prompts, params)]


def speculative(llm, drafters, tune=False, **options):
    return llm.with_options(speculative=SpeculativeConfig(drafters=drafters, max_nodes=12, tune=tune), **options)


@pytest.mark.parametrize("drafters", DRAFTER_SETS, ids=["+".join(d) for d in DRAFTER_SETS])
def test_greedy_speculation_is_identical_to_plain_greedy_batch_4(llm, prompts, plain_greedy, drafters):
    spec = speculative(llm, drafters)
    outs = spec.generate(prompts, SamplingParams(max_tokens=96, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == plain_greedy
    stats = spec.engine.speculator.stats
    assert sum(stats.accepted.values()) > 0  # the drafts were used, not only verified away
    assert_pool_empty(spec)


@pytest.mark.parametrize("drafters", [("lookup",), ("lookup", "recycling", "lookahead")], ids=["lookup", "fused-tuned"])
def test_greedy_speculation_is_identical_to_plain_greedy_batch_1(llm, prompts, plain_greedy, drafters):
    spec = speculative(llm, drafters, tune=len(drafters) > 1)
    for prompt, expected in zip(prompts[:2], plain_greedy[:2]):
        out = spec.generate(prompt, SamplingParams(max_tokens=96, temperature=0, ignore_eos=True))[0]
        assert out.token_ids == expected
    assert_pool_empty(spec)


def test_kv_stays_exact_after_every_verification(llm, prompts):
    """After each step: no extra blocks, one entry per processed token, each at its own position."""
    spec = speculative(llm, ("lookup", "recycling", "lookahead"))
    engine = spec.engine
    ids = [engine.add_request(spec.encode(p), SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)) for p in prompts[:2]]
    seqs = [engine.sequence(i) for i in ids]
    verified = 0
    while engine.has_unfinished():
        engine.step()
        for seq in seqs:
            table = seq.block_table
            if table is None:
                continue
            assert (table.lengths == seq.num_processed).all()
            assert (table.num_blocks == -(-table.lengths // table.block_size)).all()
            slots = table.slots(np.zeros(seq.num_processed, dtype=int), np.zeros(seq.num_processed, dtype=int), np.arange(seq.num_processed))
            positions = engine.pool.positions.view(-1)[torch.from_numpy(slots)]
            assert positions.tolist() == list(range(seq.num_processed))
        verified += 1
    assert verified > 0
    assert_pool_empty(spec)


def test_greedy_speculation_with_a_kv_policy_matches_plain_decoding_with_it(llm, prompts):
    policy = KVPolicyConfig("streaming_llm", budget=96)
    params = SamplingParams(max_tokens=80, temperature=0, ignore_eos=True)
    plain = llm.with_options(kv_policy=policy).generate(prompts[:2], params)
    spec = speculative(llm, ("lookup", "recycling"), kv_policy=policy)
    outs = spec.generate(prompts[:2], params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert_pool_empty(spec)


def test_speculation_feeds_an_observing_policy_and_stays_within_its_budget(llm, prompts):
    """H2O records the root query's attention in every verification forward and compresses every
    4 forwards; a forward emits at most max_depth + 1 tokens."""
    policy = KVPolicyConfig("h2o", budget=64, decode_interval=4)
    spec = speculative(llm, ("lookup", "recycling"), kv_policy=policy)
    engine = spec.engine
    request = engine.add_request(spec.encode(prompts[0]), SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))
    seq = engine.sequence(request)
    most = 0
    while engine.has_unfinished():
        engine.step()
        if seq.block_table is not None:
            most = max(most, int(seq.block_table.lengths.max()))
            assert seq.kv_attention is not None and len(seq.kv_attention) == llm.engine.model.config.num_layers
    assert len(seq.output_token_ids) == 48
    assert most <= 64 + 4 * (engine.speculator.config.max_depth + 1)
    assert engine.compressor.num_compressions > 1
    assert_pool_empty(spec)


def _joint_counts(llm, prompt, params_list) -> Counter:
    """How often each (first, second) generated token pair came out."""
    outs = llm.generate([prompt] * len(params_list), params_list)
    return Counter(tuple(o.token_ids[:2]) for o in outs)


def _chi_square_p(a: Counter, b: Counter) -> float:
    """Two-sample chi-square homogeneity test over outcomes seen at least 10 times (rest pooled)."""
    outcomes = [k for k in set(a) | set(b) if a[k] + b[k] >= 10]
    rows = [[a[k] for k in outcomes], [b[k] for k in outcomes]]
    rows[0].append(sum(a.values()) - sum(rows[0]))
    rows[1].append(sum(b.values()) - sum(rows[1]))
    table = torch.tensor(rows, dtype=torch.float64)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    statistic = ((table - expected) ** 2 / expected).sum()
    dof = table.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


def _greedy_acceptance(tree, logits, params, token_ids, seed=0, greedy_tokens=None):
    """A lossy rule: accept a drafted child when it is the target's most likely token (greedy
    verification reused under sampling), else draw from the target. It must fail the test below."""
    from tokensieve.engine.sampler import draw_token, target_distribution

    node, path, emitted = ROOT, [ROOT], []
    while True:
        probs = target_distribution(logits[node], params, token_ids + emitted)
        children = tree.children(node)
        best = int(probs.argmax())
        token = best if best in children else draw_token(logits[node], params, token_ids + emitted, seed)
        emitted.append(token)
        if token not in children:
            return path, emitted
        node = children[token]
        path.append(node)


def test_sampled_speculation_matches_plain_sampling_and_a_lossy_rule_fails(llm, monkeypatch):
    prompt = "The best thing about the city is"
    samples = 400
    # the second token is verified against a depth-1 draft (the third ends the request); a flat
    # distribution over three tokens makes a biased rule visible
    params = lambda seed: SamplingParams(max_tokens=3, temperature=3.0, top_k=3, seed=seed)  # noqa: E731
    config = SpeculativeConfig(drafters=("recycling",), max_nodes=8, tune=False)
    plain = llm.with_options(max_num_seqs=samples)
    plain_counts = _joint_counts(plain, prompt, [params(s) for s in range(samples)])

    def speculative_counts(first_seed: int) -> Counter:
        spec = llm.with_options(speculative=config, max_num_seqs=samples)
        _joint_counts(spec, prompt, [params(10_000 + s) for s in range(50)])  # Token Recycling learns successors
        before = sum(spec.engine.speculator.stats.accepted.values())
        counts = _joint_counts(spec, prompt, [params(first_seed + s) for s in range(samples)])
        assert sum(spec.engine.speculator.stats.accepted.values()) - before > samples // 2  # drafts were accepted
        return counts

    assert _chi_square_p(plain_counts, speculative_counts(samples)) > 0.001
    monkeypatch.setattr(speculator_module, "accept_path", _greedy_acceptance)
    assert _chi_square_p(plain_counts, speculative_counts(2 * samples)) < 0.001


def test_speculation_is_switched_per_request(llm):
    engine = llm.with_options().engine
    assert engine.speculator is None
    on = engine.add_request([1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(max_tokens=20, temperature=0, speculate=True))
    off = engine.add_request([1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(max_tokens=20, temperature=0))
    assert engine.sequence(on).speculates and not engine.sequence(off).speculates
    while engine.has_unfinished():
        engine.step()
    assert engine.sequence(on).output_token_ids == engine.sequence(off).output_token_ids


def test_speculative_config_rejects_unknown_drafters():
    with pytest.raises(ValueError, match="unknown drafter 'medusa'"):
        SpeculativeConfig(drafters="lookup,medusa")
    assert SpeculativeConfig(drafters="lookup, recycling").drafters == ("lookup", "recycling")


def test_seeded_sampling_gives_the_same_tokens_with_speculation(llm):
    """A draw is a function of the seed and the position (and the distribution), so verifying drafts
    draws what plain sampling draws."""
    prompt = "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox"
    params = [SamplingParams(max_tokens=24, temperature=0.7, seed=seed) for seed in range(3)]
    spec = llm.with_options(speculative=SpeculativeConfig(drafters=("lookup",), max_nodes=8, tune=False))
    plain_tokens = [o.token_ids for o in llm.generate([prompt] * 3, params)]
    assert [o.token_ids for o in spec.generate([prompt] * 3, params)] == plain_tokens
    assert spec.engine.counts["spec_accepted_tokens"] > 0
