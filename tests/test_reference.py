"""The engine against transformers' own model, loaded from the same GGUF file."""

import torch

from tokensieve import SamplingParams

PASSAGE = (
    "The history of the city begins with a small fishing village on the banks of a wide river. "
    "Over the centuries, traders arrived from the south, bringing spices, cloth and new ideas. "
)


def long_prompt(tokenizer, num_tokens=200):
    ids = tokenizer(PASSAGE * 20).input_ids
    return ids[:num_tokens]


def test_logits_match_transformers_on_a_200_token_prompt(llm, hf_model):
    ids = long_prompt(llm.tokenizer)
    ours = llm.prompt_logits({"prompt_token_ids": ids})
    with torch.inference_mode():
        ref = hf_model(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape == (200, llm.engine.model.config.vocab_size)
    assert (ours - ref).abs().max().item() <= 1e-3


def test_logits_match_with_chunked_prefill(llm, hf_model):
    """Chunks attend to entries stored by earlier chunks through the block tables."""
    chunked = llm.with_options(prefill_chunk_size=48, max_batched_tokens=64, block_size=8)
    ids = long_prompt(llm.tokenizer)
    ours = chunked.prompt_logits({"prompt_token_ids": ids})
    with torch.inference_mode():
        ref = hf_model(torch.tensor([ids])).logits[0].float()
    assert (ours - ref).abs().max().item() <= 1e-3


def test_64_greedy_tokens_match_transformers(llm, hf_model):
    prompt = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    ids = llm.encode(prompt)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))[0]
    with torch.inference_mode():
        ref = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0
        )[0, len(ids):].tolist()
    assert out.token_ids == ref
    assert out.finish_reason == "length"
