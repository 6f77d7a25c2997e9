"""Log-probabilities of generated tokens, checked against the logits of the same tokens fed as a prompt."""

import pytest
import torch

from tokensieve import SamplingParams
from tokensieve.errors import RequestError


def test_logprobs_match_the_models_distribution_at_each_generated_token(fresh_llm):
    out = fresh_llm.generate("The capital of France is", SamplingParams(max_tokens=6, temperature=0.7, seed=1, logprobs=3))[0]
    assert len(out.logprobs) == len(out.token_ids) == 6
    full = out.prompt_token_ids + out.token_ids
    reference = torch.log_softmax(fresh_llm.prompt_logits({"prompt_token_ids": full[:-1]}).float(), -1)
    for step, entry in enumerate(out.logprobs):
        row = reference[len(out.prompt_token_ids) - 1 + step]
        assert entry.token_id == out.token_ids[step]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-3)
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
        assert all(a >= b for (_, a), (_, b) in zip(entry.top, entry.top[1:]))


def test_greedy_token_is_the_top_alternative_and_zero_asks_for_the_token_only(fresh_llm):
    out = fresh_llm.generate("One, two, three,", SamplingParams(max_tokens=4, temperature=0, logprobs=1))[0]
    assert all(e.top[0] == (e.token_id, e.logprob) for e in out.logprobs)
    bare = fresh_llm.generate("One, two, three,", SamplingParams(max_tokens=4, temperature=0, logprobs=0))[0]
    assert all(e.top == [] for e in bare.logprobs) and bare.token_ids == out.token_ids
    assert fresh_llm.generate("One,", SamplingParams(max_tokens=2, temperature=0))[0].logprobs is None


def test_logprobs_out_of_range_is_a_clear_error():
    with pytest.raises(RequestError, match=r"logprobs must be None or an integer in \[0, 20\]"):
        SamplingParams(logprobs=21)
