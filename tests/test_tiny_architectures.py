"""Random-weight Llama, Mistral, Qwen2 and Qwen3 models: our logits against transformers'."""

import pytest
import torch

from tokensieve import LLM, SamplingParams

COMMON = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, vocab_size=49152, initializer_range=0.2, tie_word_embeddings=False,
)


def build(kind):
    import transformers as tf

    if kind == "llama":
        return tf.LlamaConfig(**COMMON, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        })
    if kind == "mistral":
        return tf.MistralConfig(**COMMON, sliding_window=24)
    if kind == "qwen2":
        return tf.Qwen2Config(**COMMON)
    return tf.Qwen3Config(**{**COMMON, "tie_word_embeddings": True}, head_dim=32)


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3"])
def tiny(request, tmp_path_factory, llm):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = build(request.param)
    config._attn_implementation = "eager"
    hf = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    llm.tokenizer.save_pretrained(folder)  # any tokenizer with this vocabulary will do
    return request.param, hf, folder


def test_logits_match_transformers(tiny):
    kind, hf, folder = tiny
    ours = LLM(str(folder), prefill_chunk_size=16, block_size=4)  # several chunks: paged attention with a past
    ids = torch.randint(0, 49152, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    logits = ours.prompt_logits({"prompt_token_ids": ids})
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (logits - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("static_decode", [False, True])
def test_greedy_tokens_match_transformers(tiny, static_decode):
    kind, hf, folder = tiny
    ours = LLM(str(folder), block_size=4, static_decode=static_decode)
    ids = torch.randint(0, 49152, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    out = ours.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    assert out.token_ids == ref[0, 20:].tolist()
