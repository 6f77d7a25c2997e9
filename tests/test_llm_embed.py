"""LLM.embed against pooling transformers' final hidden states of the same model (loaded from the same GGUF)."""

import pytest
import torch
import torch.nn.functional as F

from tokensieve.errors import ContextLengthError, RequestError
from tokensieve.llm_embedding import PROMPTS, causal_attention

TEXTS = [
    "The lighthouse keeper climbed the stairs every evening to light the lamp.",
    "Cats sleep a lot.",
    "A small fishing village grew into a city as traders arrived from the south, bringing spices and cloth.",
]


@pytest.fixture(scope="module")
def reference(llm, hf_model):
    """reference(text, pooling, template): transformers' pooled final hidden state (each text run once)."""
    hidden_of = {}

    def pooled(text: str, pooling: str, template: str = "{text}") -> torch.Tensor:
        prompt = template.replace("{text}", text)
        if prompt not in hidden_of:
            with torch.inference_mode():  # in transformers 5, hidden_states[-1] is last_hidden_state: after the final norm
                out = hf_model(torch.tensor([llm.tokenizer(prompt).input_ids]), output_hidden_states=True)
            hidden_of[prompt] = out.hidden_states[-1][0].float()
        hidden = hidden_of[prompt]
        return hidden[-1] if pooling == "last" else hidden.mean(0)

    return pooled


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooled_states_match_transformers(llm, reference, pooling):
    ours = llm.embed(TEXTS, pooling=pooling, normalize=False)
    ref = torch.stack([reference(text, pooling) for text in TEXTS])
    assert ours.dtype == torch.float32 and ours.shape == (len(TEXTS), llm.engine.model.config.hidden_size)
    assert (ours - ref).abs().max().item() <= 1e-3


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_normalized_vectors_match_transformers(llm, reference, pooling):
    ours = llm.embed(TEXTS, pooling=pooling)
    ref = torch.stack([reference(text, pooling) for text in TEXTS])
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    assert F.cosine_similarity(ours, ref).min().item() >= 0.99999


@pytest.mark.parametrize("prompt", ["prompteol", 'Text: {text}\nSummary in one word:"'])
def test_prompt_templates_match_transformers(llm, reference, prompt):
    ours = llm.embed(TEXTS[:2], prompt=prompt, normalize=False)
    template = PROMPTS.get(prompt, prompt)
    ref = torch.stack([reference(text, "last", template) for text in TEXTS[:2]])
    assert (ours - ref).abs().max().item() <= 1e-3


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_a_padded_batch_equals_each_text_alone(llm, pooling):
    together = llm.embed(TEXTS, pooling=pooling, batch_size=2)  # a batch of two texts of different lengths
    alone = torch.stack([llm.embed(text, pooling=pooling) for text in TEXTS])
    assert F.cosine_similarity(together, alone).min().item() >= 0.99999


def test_a_single_string_gives_one_vector(llm):
    vector = llm.embed(TEXTS[1])
    assert vector.shape == (llm.engine.model.config.hidden_size,) and vector.dtype == torch.float32
    assert torch.equal(vector, llm.embed([TEXTS[1]])[0])


def test_sliding_window_attention_sees_only_the_window():
    batch, length, heads, kv_heads, dim, window = 2, 7, 4, 2, 8, 3
    q = torch.randn(batch * length, heads, dim)
    k, v = torch.randn(2, batch * length, kv_heads, dim)
    out = causal_attention(batch, length, window, torch.device("cpu"))(0, q, k, v)
    for row in range(batch):
        for i in range(length):
            seen = range(max(0, i - window + 1), i + 1)
            keys = k[[row * length + j for j in seen]].repeat_interleave(heads // kv_heads, dim=1)  # [seen, heads, dim]
            values = v[[row * length + j for j in seen]].repeat_interleave(heads // kv_heads, dim=1)
            weights = torch.softmax(torch.einsum("hd,shd->hs", q[row * length + i], keys) / dim**0.5, dim=-1)
            torch.testing.assert_close(out[row * length + i], torch.einsum("hs,shd->hd", weights, values))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"texts": []}, "non-empty list of strings"),
        ({"texts": 5}, "non-empty list of strings"),
        ({"texts": ["fine", ""]}, "text 1 must be a non-empty string"),
        ({"texts": ["fine", 3]}, "text 1 must be a non-empty string"),
        ({"texts": "fine", "pooling": "max"}, "pooling must be one of last, mean"),
        ({"texts": "fine", "prompt": "no placeholder"}, "template containing {text}"),
        ({"texts": "fine", "batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_bad_requests_are_clear_errors(llm, kwargs, message):
    with pytest.raises(RequestError, match=message.replace("{", r"\{").replace("}", r"\}")):
        llm.embed(**kwargs)


def test_a_text_longer_than_the_context_names_the_limit(llm):
    limit = llm.engine.max_model_len
    with pytest.raises(ContextLengthError, match=f"maximum context length is {limit} tokens; text 1 has") as error:
        llm.embed(["fine", "word " * (limit + 10)])
    assert error.value.max_model_len == limit and error.value.num_tokens > limit
