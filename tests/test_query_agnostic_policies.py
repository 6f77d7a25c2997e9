"""KeyDiff, ExpectedAttention and KVzip on hand-made entries, against their formulas written out
directly; the query moments and KVzip's repeat prompts. No model needed (the engine-level checks,
unlimited budget and freed blocks, are in test_kv_policies.py and below with the real model)."""

import math

import torch
import torch.nn.functional as F

from conftest import assert_pool_empty
from tokensieve import SamplingParams
from tokensieve.config import KVPolicyConfig
from tokensieve.engine.query_moments import QuerySums, unrotate
from tokensieve.models.rope import RotaryEmbedding, apply_rotary
from tokensieve.policies import EntryView, QueryMoments, make_policy
from tokensieve.policies.kvzip import FIRST_REPEAT, NEXT_REPEAT

INF = float("inf")


def view_of(keys, values, lengths, queries=None):
    """An EntryView of one layer's keys and values [kv_heads, entries, dim], entries at positions 0..."""
    positions = torch.arange(keys.shape[1]).expand(1, keys.shape[0], -1)
    view = EntryView(None, positions, torch.tensor([lengths]), torch.tensor([[1] * keys.shape[0]]))
    view.stored = lambda layer: (keys, values)
    view.queries = queries
    return view


def test_keydiff_keeps_the_keys_least_like_the_heads_mean_direction():
    torch.manual_seed(0)
    keys = torch.randn(2, 6, 8)
    keys[0, :5] = keys[0, :1] + 0.01 * torch.randn(5, 8)  # head 0: five alike, entry 5 differs
    scores = make_policy("keydiff").scores(view_of(keys, keys, [6, 4]))
    assert int(scores[0, 0].argmax()) == 5
    for head, length in enumerate([6, 4]):  # the mean is over the stored entries only
        anchor = F.normalize(keys[head, :length], dim=-1).mean(0)
        expected = -F.cosine_similarity(keys[head, :length], anchor.expand(length, -1), dim=-1)
        torch.testing.assert_close(scores[0, head, :length], expected)


def test_expected_attention_is_its_formula_and_keeps_the_sinks():
    torch.manual_seed(0)
    kv_heads, group, entries, dim = 2, 3, 10, 8
    keys, values = torch.randn(kv_heads, entries, dim), torch.randn(kv_heads, entries, dim)
    mean, half_cov = torch.randn(1, kv_heads * group, dim), 0.3 * torch.randn(1, kv_heads * group, dim, dim)
    covariance = half_cov @ half_cov.transpose(-1, -2)
    angles = torch.rand(dim // 2)
    cos, sin = torch.cat([angles.cos()] * 2) * 0.9, torch.cat([angles.sin()] * 2) * 0.9  # an averaged rotation shrinks
    policy = make_policy("expected_attention", {"sinks": 2, "epsilon": 0.01})
    scores = policy.scores(view_of(keys, values, [entries, entries], QueryMoments(mean, covariance, cos, sin)))
    rotate = lambda x: x * cos + torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], -1) * sin  # noqa: E731
    rotation = torch.stack([rotate(e) for e in torch.eye(dim)], dim=1)  # R e_i as columns
    for head in range(kv_heads):
        probabilities = []
        for query_head in range(head * group, (head + 1) * group):
            mu, sigma = rotate(mean[0, query_head]), rotation @ covariance[0, query_head] @ rotation.T
            logits = torch.stack([k @ mu / math.sqrt(dim) + k @ sigma @ k / (2 * dim) for k in keys[head, 2:]])
            probabilities.append(torch.softmax(logits, -1))
        expected = (torch.stack(probabilities).mean(0) + 0.01) * values[head, 2:].norm(dim=-1)
        torch.testing.assert_close(scores[0, head, 2:], expected, rtol=1e-4, atol=1e-6)
        assert scores[0, head, :2].tolist() == [INF, INF]


def test_query_moments_are_the_mean_and_covariance_of_the_queries_before_rope():
    torch.manual_seed(0)
    rotary = RotaryEmbedding(8, 64, 10000.0, None)
    pre_rope = torch.randn(20, 3, 8)
    positions = torch.arange(5, 25)
    cos, sin = rotary(positions, torch.float32)
    post_rope = apply_rotary(pre_rope, cos, sin)
    torch.testing.assert_close(unrotate(post_rope, positions, rotary), pre_rope, atol=1e-5, rtol=1e-5)
    sums = QuerySums(num_layers=1, num_heads=3, head_dim=8, device=torch.device("cpu"))
    sums.add(0, pre_rope[:7])
    sums.add(0, pre_rope[7:])  # in two chunks
    moments = sums.moments(rotary, next_position=25, future_positions=16)
    torch.testing.assert_close(moments.mean[0], pre_rope.mean(0))
    for head in range(3):
        torch.testing.assert_close(moments.covariance[0, head], torch.cov(pre_rope[:, head].T, correction=0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(moments.future_cos, rotary.cos[25:41].mean(0))
    # near the end of the table only the positions it holds are averaged
    torch.testing.assert_close(sums.moments(rotary, 60, 16).future_sin, rotary.sin[60:64].mean(0))


def test_kvzip_repeats_each_chunk_after_its_instruction_and_the_previous_chunks_last_tokens():
    policy = make_policy("kvzip", {"overlap": 2})
    encode = lambda text: [len(text)]  # noqa: E731 - one stand-in token per instruction
    context, turn_end = list(range(100, 110)), [7, 8]
    assert policy.repeat_chunks(context, encode, turn_end, chunk_tokens=4) == [
        [len(FIRST_REPEAT), 7, 8, 100, 101, 102, 103],
        [len(NEXT_REPEAT), 102, 103, 7, 8, 104, 105, 106, 107],
        [len(NEXT_REPEAT), 106, 107, 7, 8, 108, 109],
    ]


def test_kvzip_scores_the_context_by_repeating_it_then_frees_the_repeat_and_the_evicted(llm):
    context = "The harbour town kept its old lighthouse. The keeper, Ilse, lit the lamp at nine. " * 8
    budget = 48
    policy_llm = llm.with_options(kv_policy=KVPolicyConfig("kvzip", budget=budget, options={"chunk_tokens": 64}),
                                  kv_cache_bytes=64 * 1024**2)
    engine = policy_llm.engine
    token_ids, compress_len = policy_llm._encode_request({"context": context, "question": "Who lights the lamp?"})
    request_id = engine.add_request(token_ids, SamplingParams(max_tokens=4, temperature=0), compress_len=compress_len)
    seq = engine.sequence(request_id)
    while engine.has_unfinished():
        engine.step()
        if seq.num_processed == compress_len:
            after_context = seq.block_table.lengths.copy()
            attention = [record.clone() for record in seq.kv_attention]
    assert engine.compressor.num_compressions == 1  # once, when the whole context was in
    assert engine.compressor.reconstruct.seconds > 0
    assert (after_context == budget).all()  # the repeat's entries are gone, the context cut to the budget
    assert all(float(record[:, 4:budget].min()) > 0 for record in attention)  # every kept entry was attended by the repeat
    engine.release(request_id)
    assert_pool_empty(policy_llm)


def test_kvzip_without_free_blocks_to_repeat_the_context_keeps_entries_by_position_and_serves_on(llm, caplog):
    context = "The keeper, Ilse, lit the lamp at nine. " * 12
    probe = llm.with_options(kv_policy=KVPolicyConfig("kvzip", budget=32))
    token_ids, compress_len = probe._encode_request({"context": context, "question": "Who?"})
    pool, config = probe.engine.pool, probe.engine.model.config
    heads = config.num_layers * config.num_kv_heads
    blocks_per_head = -(-(len(token_ids) + 4) // pool.block_size) + 2  # the prompt and its answer, little more
    tight = llm.with_options(kv_policy=KVPolicyConfig("kvzip", budget=32), kv_cache_bytes=blocks_per_head * heads * pool.bytes_per_block)
    out = tight.generate({"context": context, "question": "Who?"}, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
    assert "no free KV blocks to repeat the context" in caplog.text
    assert tight.engine.compressor.num_compressions == 1  # still cut to the budget, by position
    assert_pool_empty(tight)
