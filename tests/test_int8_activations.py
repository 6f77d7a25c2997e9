"""int8 activations (`activations="int8"`): the kernel against the arithmetic it stands for, and the
engine on the real default model: close to float32, speculation identical to its own plain decoding."""

import pytest
import torch
import torch.nn.functional as F

from tokensieve import LLM, EngineConfig, SamplingParams
from tokensieve.config import SpeculativeConfig
from tokensieve.errors import ModelLoadError
from tokensieve.models.int8_weight import Int8Weight
from tokensieve.models.quantized import QuantizedWeight
from tokensieve.weights import load_model

from conftest import assert_pool_empty
from test_kernels import kernels, random_gguf_tensor  # noqa: F401 (the fixture)
from test_speculative import prompts  # noqa: F401 (the fixture: four Spec-Bench prompts)


def int8_rows(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernel rounds it: per 32-entry block, to the nearest multiple of max|x| / 127."""
    blocks = x.reshape(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse) * scale).reshape(x.shape)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_int8_matmul_is_the_rounded_rows_times_the_gguf_weights(kernels, type_name):  # noqa: F811
    import gguf

    rows, cols = 40, 256  # 40 outputs: the last group of 16 is partly empty
    raw = random_gguf_tensor(type_name, rows, cols, seed=7 + len(type_name))
    dense = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(rows, cols))
    weight = Int8Weight.pack(QuantizedWeight.from_gguf(raw, type_name))
    x = torch.randn(25, cols, generator=torch.Generator().manual_seed(1))
    x[3, :32] = 0.0  # a block of zeros has scale 0
    out = weight.matmul(x, kernels)
    assert out.shape == (25, rows)
    reference = (int8_rows(x).double() @ dense.double().T).float()
    assert (out - reference).abs().max() <= 1e-5 * reference.abs().max()
    # the rounding is what moves the result away from float32 activations, by about half a percent
    relative = (out - F.linear(x, dense)).norm() / F.linear(x, dense).norm()
    assert 1e-4 < relative < 2e-2
    # a row's result does not depend on the other rows (passes of 8 or 9 rows, or one alone)
    for i in range(25):
        assert torch.equal(weight.matmul(x[i : i + 1], kernels)[0], out[i])
    assert torch.equal(weight.matmul(x[:13], kernels), out[:13])


@pytest.fixture(scope="module")
def int8_llm():
    # no prefix caching: a prompt started from cached KV computes its last tokens in another prefill chunk,
    # whose float32 attention rounding int8 rounding can turn into another token (README, int8 activations)
    return LLM("smollm2-135m", activations="int8", prefix_caching=False)


@pytest.fixture(scope="module")
def int8_plain(int8_llm, prompts):  # noqa: F811
    params = SamplingParams(max_tokens=96, temperature=0, ignore_eos=True)
    return [out.token_ids for out in int8_llm.generate(prompts, params)]


def test_int8_logits_stay_close_to_float32(llm, int8_llm):
    ids = torch.tensor(llm.encode([{"role": "user", "content": "Explain in three sentences why the sky is blue."}]))
    positions = torch.arange(len(ids))
    from test_gguf_loading import causal_attention

    exact = llm.engine.model(ids, positions, causal_attention)
    rounded = int8_llm.engine.model(ids, positions, causal_attention)
    assert int8_llm.engine.model.lm_head.native.max_rows > len(ids)  # the prompt went through the int8 kernel
    assert (rounded - exact).norm() / exact.norm() < 0.05
    assert (rounded.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9


def test_int8_output_does_not_depend_on_the_batch(int8_llm, prompts, int8_plain):
    params = SamplingParams(max_tokens=96, temperature=0, ignore_eos=True)
    assert [int8_llm.generate(prompt, params)[0].token_ids for prompt in prompts] == int8_plain


def test_int8_greedy_speculation_is_identical_to_int8_plain_greedy(int8_llm, prompts, int8_plain):
    params = SamplingParams(max_tokens=96, temperature=0, ignore_eos=True)
    fixed = SpeculativeConfig(drafters=("lookup", "recycling", "lookahead"), max_nodes=12, tune=False)
    spec = int8_llm.with_options(speculative=fixed)
    assert [o.token_ids for o in spec.generate(prompts, params)] == int8_plain  # batch 4
    assert sum(spec.engine.speculator.stats.accepted.values()) > 0
    tuned = int8_llm.with_options(speculative=SpeculativeConfig())
    for prompt, expected in zip(prompts[:2], int8_plain[:2]):  # batch 1
        assert tuned.generate(prompt, params)[0].token_ids == expected
    assert_pool_empty(spec)
    assert_pool_empty(tuned)


def test_int8_activations_are_refused_where_they_cannot_run(llm, tmp_path):
    with pytest.raises(ValueError, match="activations must be one of"):
        EngineConfig(activations="int4")
    for setting in ({"native_kernels": False}, {"dtype": "bfloat16"}):
        with pytest.raises(ValueError, match="activations='int8' runs in the native CPU kernels"):
            EngineConfig(activations="int8", **setting)
    with pytest.raises(ValueError, match="activations"):
        llm.with_options(activations="int8")
    with pytest.raises(ModelLoadError, match="needs the native kernels"):
        load_model("smollm2-135m", kernels=None, activations="int8")


def test_int8_activations_need_gguf_blocks(kernels, tmp_path):  # noqa: F811
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=256, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="multiplies GGUF Q4_0/Q4_1/Q8_0 blocks"):
        load_model(tmp_path, kernels=kernels, activations="int8")


def test_the_fast_path_stores_float16_kv_which_adds_little_to_the_error(llm, int8_llm):
    """Against the float32 reference: float16 entries move the logits by 0.04%, int8 activations by 4%."""
    assert int8_llm.engine.kv_dtype == "float16" and int8_llm.engine.pool.bytes_per_entry == 2 * 64 * 2
    prompt = [{"role": "user", "content": "Explain in three sentences why the sky is blue."}]
    logits = lambda engine, kv_dtype: engine.with_options(kv_dtype=kv_dtype, prefill_chunk_size=8).prompt_logits(prompt)
    reference = logits(llm, "float32")  # chunks of 8: every later chunk reads the pool
    error = lambda other: ((other - reference).norm() / reference.norm()).item()
    assert error(logits(llm, "float16")) < 1e-3
    assert error(logits(int8_llm, "float16")) < 0.05


def test_the_default_runs_int8_where_it_applies_and_says_what_it_runs(int8_llm, llm):
    assert llm.engine.activations == "float32" and llm.engine.kv_dtype == "float32"  # asked for the reference
    default = LLM("smollm2-135m")
    assert default.engine.activations == "int8" and default.engine.stats()["kv_dtype"] == "float16"
    model = default.engine.model
    assert model.embed_tokens.weight is None  # no float32 copy of what the blocks hold
    assert model.embed_tokens.native.packed.data_ptr() == model.lm_head.native.packed.data_ptr()  # tied: one copy
    elsewhere = LLM("smollm2-135m", dtype="bfloat16")  # no int8 kernel for bfloat16: it runs, and says, bfloat16
    assert elsewhere.engine.stats()["activations"] == "bfloat16" and elsewhere.engine.stats()["kv_dtype"] == "bfloat16"
