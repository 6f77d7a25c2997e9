"""KV policies in the engine, on the real default model: lossless without eviction, positions right
after eviction, memory bounded during a long prefill, question kept whole when query-agnostic."""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_pool_empty
from tokensieve import SamplingParams
from tokensieve.config import KVPolicyConfig
from tokensieve.policies import POLICIES

ARTICLE = (
    "The harbour town kept its old lighthouse long after ships stopped needing it. Every evening the keeper, "
    "a retired teacher named Ilse, climbed the ninety steps to light the lamp for the tourists. "
)
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def full_cache_outputs(llm):
    prompts = [{"context": ARTICLE * 12, "question": "Who lights the lamp?"}, ARTICLE * 5 + "Summarize:"]
    return prompts, [out.token_ids for out in llm.generate(prompts, GREEDY)]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_unlimited_budget_reproduces_the_full_cache_token_for_token(llm, full_cache_outputs, name):
    prompts, expected = full_cache_outputs
    interval = None if POLICIES[name].reconstructs else 4
    config = KVPolicyConfig(name, budget=None if name == "full" else 10**6, decode_interval=interval)
    policy_llm = llm.with_options(kv_policy=config, kv_cache_bytes=256 * 1024**2, prefill_chunk_size=128)
    assert [out.token_ids for out in policy_llm.generate(prompts, GREEDY)] == expected
    assert_pool_empty(policy_llm)


class MaskedReference:
    """Attention over the whole sequence with a [queries, keys] visibility mask: what a model sees
    when the evicted entries are hidden but every other entry keeps its true position."""

    def __init__(self, visible: torch.Tensor):
        self.visible = visible

    def __call__(self, layer, q, k, v):
        group = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(group, dim=1).transpose(0, 1) for t in (k, v))
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=self.visible)
        return out.transpose(0, 1)


def test_positions_stay_correct_after_eviction(llm):
    """StreamingLLM after prefill: greedy decoding equals a full forward in which the evicted prompt
    entries are masked out and every entry keeps the position it was computed at."""
    prompt_ids = llm.encode(ARTICLE * 6)
    n, budget, sinks = len(prompt_ids), 96, 4
    policy_llm = llm.with_options(kv_policy=KVPolicyConfig("streaming_llm", budget=budget), kv_cache_bytes=256 * 1024**2)
    out = policy_llm.generate({"prompt_token_ids": prompt_ids}, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert policy_llm.engine.compressor.num_compressions == 1
    kept = set(range(sinks)) | set(range(n - (budget - sinks), n))
    tokens = list(prompt_ids)
    model = llm.engine.model
    for expected in out.token_ids:
        length = len(tokens)
        visible = torch.ones(length, length).tril().bool()
        evicted = [j for j in range(n) if j not in kept]
        visible[n - 1 :, evicted] = False  # queries after prefill no longer see evicted prompt entries
        visible[:n] = torch.ones(length, length).tril().bool()[:n]  # ... but the prompt's own forward did
        logits = model(torch.tensor(tokens), torch.arange(length), MaskedReference(visible), torch.tensor([length - 1]))
        assert int(logits.argmax()) == expected
        tokens.append(expected)


def test_long_prefill_never_holds_more_than_budget_plus_one_chunk(llm):
    budget, chunk = 512, 1024
    config = KVPolicyConfig("snapkv", budget=budget)
    policy_llm = llm.with_options(kv_policy=config, prefill_chunk_size=chunk, max_batched_tokens=chunk)
    engine = policy_llm.engine
    prompt_ids = (llm.encode(ARTICLE) * 200)[:8000]
    request_id = engine.add_request(prompt_ids, SamplingParams(max_tokens=2, temperature=0))
    most_entries, most_blocks = 0, 0
    while engine.has_unfinished():
        schedule_blocks = engine.block_manager
        engine.step()
        most_blocks = max(most_blocks, schedule_blocks.peak_used_blocks)
        seq = engine.sequence(request_id)
        if seq.block_table is not None:
            most_entries = max(most_entries, int(seq.block_table.lengths.max()))
    cfg = engine.model.config
    blocks_per_head = -(-(budget + chunk) // engine.config.block_size)
    assert most_blocks <= cfg.num_layers * cfg.num_kv_heads * blocks_per_head
    assert most_entries <= budget + 2  # after each chunk, plus the decoded tokens
    assert engine.compressor.num_compressions == 8
    engine.abort(request_id)
    assert_pool_empty(policy_llm)


def test_query_agnostic_compresses_the_context_only_and_keeps_the_question(llm):
    context, question = ARTICLE * 12, "Who lights the lamp?"
    policy_llm = llm.with_options(kv_policy=KVPolicyConfig("h2o", keep_ratio=0.25), kv_cache_bytes=256 * 1024**2)
    engine = policy_llm.engine
    token_ids, compress_len = policy_llm._encode_request({"context": context, "question": question})
    assert 0 < compress_len < len(token_ids)
    request_id = engine.add_request(token_ids, SamplingParams(max_tokens=2, temperature=0), compress_len=compress_len)
    seq = engine.sequence(request_id)
    chunk_ends = []
    while engine.has_unfinished():
        engine.step()
        chunk_ends.append(seq.num_processed)
        if seq.num_processed == compress_len:
            stored_after_context = seq.block_table.lengths.copy()
        if seq.num_processed == len(token_ids):
            stored_at_end = seq.block_table.lengths.copy()
    assert compress_len in chunk_ends  # the question is never in the same chunk as the context
    assert (stored_after_context == -(-compress_len // 4)).all()  # a quarter of the context
    # the question's entries were appended after compression, none evicted
    assert (stored_at_end - stored_after_context == len(token_ids) - compress_len).all()


def test_decode_interval_keeps_a_generating_sequence_near_its_budget(llm):
    budget, interval = 64, 8
    config = KVPolicyConfig("tova", budget=budget, decode_interval=interval)
    policy_llm = llm.with_options(kv_policy=config, kv_cache_bytes=256 * 1024**2)
    engine = policy_llm.engine
    request_id = engine.add_request(llm.encode(ARTICLE * 2), SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    seq = engine.sequence(request_id)
    most = 0
    while engine.has_unfinished():
        engine.step()
        if seq.block_table is not None:
            most = max(most, int(seq.block_table.lengths.max()))
    assert most <= budget + interval
    assert engine.compressor.num_compressions >= 40 // interval
    engine.release(request_id)
    assert_pool_empty(policy_llm)


def test_global_budgets_may_leave_a_whole_layer_empty_and_the_engine_serves_on(llm):
    config = KVPolicyConfig("keydiff", budget=2, allocation="global")
    policy_llm = llm.with_options(kv_policy=config, kv_cache_bytes=256 * 1024**2, prefill_chunk_size=64)
    engine = policy_llm.engine
    request_id = engine.add_request(llm.encode(ARTICLE * 4), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    seq = engine.sequence(request_id)
    emptied = False
    while engine.has_unfinished():
        engine.step()
        if seq.block_table is not None:  # later chunks of an emptied layer attend to themselves only
            emptied |= bool((seq.block_table.lengths.max(axis=1) == 0).any())
    assert emptied and len(seq.token_ids) == seq.num_prompt_tokens + 6
    engine.release(request_id)
    assert_pool_empty(policy_llm)
