"""The static decode step (what CUDA graphs replay), run eagerly on the CPU: same tokens as the eager
path, padding to a bucket changes nothing, no host sync inside the step, no leaked blocks."""

import pytest
import torch
from conftest import assert_pool_empty, no_host_sync, triton_modules

from tokensieve import SamplingParams
from tokensieve.config import EngineConfig, KVPolicyConfig, SpeculativeConfig
from tokensieve.engine.block_table import BlockTable
from tokensieve.engine.static_decode import bucket, powers_of_two
from tokensieve.errors import ConfigError

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "A short story about a robot who learns to paint:",
    "List three prime numbers:",
    "In 1492,",
]


def test_buckets_are_powers_of_two():
    assert powers_of_two(1) == [1] and powers_of_two(5) == [1, 2, 4, 8] and powers_of_two(16) == [1, 2, 4, 8, 16]
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9, 100)] == [1, 2, 4, 8, 8, 16, 128]


def _generate(llm, max_tokens: list[int], **options):
    engine = llm.with_options(max_model_len=512, kv_cache_bytes=64 * 1024**2, **options)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in max_tokens]
    outputs = engine.generate(PROMPTS[: len(max_tokens)], params)
    assert_pool_empty(engine)
    return engine, [o.token_ids for o in outputs]


def test_static_decode_gives_the_eager_path_tokens_as_the_batch_shrinks(llm):
    """Five requests ending at different steps: the batch crosses buckets 8, 4, 2 and 1."""
    lengths = [3, 20, 9, 14, 6]
    _, eager = _generate(llm, lengths, static_decode=False)
    engine, static = _generate(llm, lengths, static_decode=True)
    assert static == eager
    decoder = engine.engine.runner.static_decoder
    assert set(decoder.inputs) == {(1, 1), (2, 1), (4, 1), (8, 1)}  # every bucket ran
    assert engine.engine.block_manager.num_blocks == engine.engine.pool.num_blocks - 1  # the scratch block


def test_sampled_tokens_match_with_the_same_seed(llm):
    params = [SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=s) for s in (1, 2)]
    outs = [llm.with_options(max_model_len=512, static_decode=flag).generate(PROMPTS[:2], params) for flag in (False, True)]
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]


def test_the_static_step_never_reads_back_from_the_device(llm):
    engine = llm.with_options(max_model_len=256, static_decode=True).engine
    ids = [engine.add_request(llm.encode(p), SamplingParams(max_tokens=4, temperature=0)) for p in PROMPTS[:3]]
    engine.step(), engine.step()  # the prefill, and a first decoding step (which sizes the host buffer)
    schedule = engine.scheduler.schedule()
    assert engine.runner.static_decoder.takes(schedule.chunks)
    with no_host_sync():
        logits, rows = engine.runner.static_decoder.forward(schedule.chunks)
    assert rows == 1 and logits.shape == (4, engine.model.config.vocab_size) and torch.isfinite(logits).all()
    for request_id in ids:
        engine.abort(request_id)


def test_static_decode_needs_decoding_that_attends_to_every_entry():
    with pytest.raises(ConfigError, match="static_decode"):
        EngineConfig(static_decode=True, kv_policy=KVPolicyConfig("snapkv", budget=64))
    assert not EngineConfig(device="cuda", kv_policy=KVPolicyConfig("snapkv", budget=64)).uses_static_decode
    assert EngineConfig(device="cuda").uses_static_decode and not EngineConfig().uses_static_decode


def test_places_are_reused_across_preemption_and_shared_blocks(llm, monkeypatch):
    """Five requests through two places in a pool small enough to preempt; two are the same prompt, so
    the blocks they generate alike are deduplicated in the prefix cache: the device tables follow."""
    replaced, original = [], BlockTable.replace_column
    monkeypatch.setattr(BlockTable, "replace_column", lambda table, *args: replaced.append(original(table, *args)))
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[2], PROMPTS[1], PROMPTS[3]]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    block_bytes = 16 * 64 * 4 * 2  # keys and values of 16 entries of one (layer, KV head)
    options = dict(max_num_seqs=2, kv_cache_bytes=(3 * 30 * 3 + 1) * block_bytes)  # 3 blocks of 16 tokens: 1.5 sequences
    eager = llm.with_options(static_decode=False, **options)
    static = llm.with_options(static_decode=True, **options)
    expected = [o.token_ids for o in eager.generate(prompts, params)]
    assert [o.token_ids for o in static.generate(prompts, params)] == expected
    assert static.engine.scheduler.num_preemptions > 0 and replaced
    assert_pool_empty(static)


def test_draft_trees_are_verified_in_the_static_step(llm):
    """Speculating requests beside a plain one: their blocks are padded to one row count and verified in
    the static step, with the same tokens as plain decoding."""
    from test_speculative import spec_bench_prompts

    prompts = spec_bench_prompts(["coding"]) + ["Repeat: the cat sat on the mat. The cat sat on the mat. The cat",
                                                "Count from one to twenty: one, two, three,"]
    config = SpeculativeConfig(drafters=("lookup", "recycling", "lookahead"), max_nodes=12, tune=False)
    spec = llm.with_options(static_decode=True, speculative=config)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    plain = [o.token_ids for o in llm.generate(prompts, params)]
    per_request = [params, params, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, speculate=False)]
    assert [o.token_ids for o in spec.generate(prompts, per_request)] == plain
    assert spec.engine.counts["spec_accepted_tokens"] > 0
    assert any(rows > 1 for _, rows in spec.engine.runner.static_decoder.inputs)
    assert_pool_empty(spec)


def test_gpu_defaults_differ_where_a_gpu_differs():
    """Prefill chunks: 512 on a CPU, 2048 on a GPU (an eager forward's launches outweigh its arithmetic there)."""
    assert EngineConfig().prefill_chunk_size == 512 and EngineConfig(device="cuda").prefill_chunk_size == 2048
    assert EngineConfig(device="cuda", prefill_chunk_size=256).prefill_chunk_size == 256


def test_the_triton_kernels_wired_into_the_static_step_give_the_eager_path_tokens(monkeypatch):
    """What CUDA runs, on the CPU: the static step with the Triton layer ops and decode attention (through
    Triton's interpreter) on a tiny random Qwen3 (q/k norms; weights large enough that attention decides
    tokens), plain decoding beside speculation (draft trees verified by the tree kernel), against the eager
    path's greedy tokens."""
    from test_tiny_architectures import build
    from transformers import AutoModelForCausalLM

    from tokensieve.bench.model_shapes import ours_from_hf, vocabulary_tokenizer
    from tokensieve.engine import static_inputs
    from tokensieve.engine.engine import LLMEngine
    from tokensieve.kernels import chosen_layer_ops

    torch.manual_seed(0)
    model = ours_from_hf(AutoModelForCausalLM.from_config(build("qwen3")).eval())
    tokenizer, _ = vocabulary_tokenizer()
    prompts = [list(range(300, 304)) * 3, list(range(1000, 1006)), [2000, 2001]]  # the first gives lookup drafts
    # the second ends first: the third then decodes at batch index 1 from place 2 of the device tables
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (6, 2, 6)]

    def tokens(**options):
        config = EngineConfig(native_kernels=False, kv_cache_bytes=16 * 1024**2, block_size=4, **options)
        engine = LLMEngine(model, config, tokenizer)
        ids = [engine.add_request(prompt, p) for prompt, p in zip(prompts, params)]
        finals = {}
        while len(finals) < len(ids):
            finals |= {out.request_id: out.token_ids for out in engine.step() if out.finished}
        return engine, [finals[request_id] for request_id in ids]

    _, eager = tokens(static_decode=False)
    with triton_modules("tokensieve.kernels.triton_ops", "tokensieve.engine.triton_decode") as ((ops, decode), _), \
            chosen_layer_ops(ops):
        monkeypatch.setattr(static_inputs, "paged_decode_attention", decode.paged_decode_attention_triton)
        _, static = tokens(static_decode=True)
        spec_engine, speculative = tokens(static_decode=True, speculative=SpeculativeConfig(max_nodes=8, tune=False))
    assert static == eager and speculative == eager
    assert spec_engine.counts["spec_accepted_tokens"] > 0
    assert any(rows > 1 for _, rows in spec_engine.runner.static_decoder.inputs)
