"""Logit warping and seeded sampling on hand-made logits."""

import pytest
import torch

from tokensieve import RequestError, SamplingParams
from tokensieve.engine.sampler import apply_repetition_penalty, target_distribution


def test_top_k_keeps_the_k_best():
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0])
    probs = target_distribution(logits, SamplingParams(top_k=2), [])
    assert (probs > 0).tolist() == [False, True, True, False]
    assert torch.allclose(probs[1:3], torch.softmax(torch.tensor([4.0, 3.0]), 0))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs_in = torch.tensor([0.5, 0.3, 0.15, 0.05])
    probs = target_distribution(probs_in.log(), SamplingParams(top_p=0.8), [])
    assert (probs > 0).tolist() == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    probs = target_distribution(probs_in.log(), SamplingParams(top_p=0.81), [])
    assert (probs > 0).tolist() == [True, True, True, False]


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs_in = torch.tensor([0.6, 0.25, 0.1, 0.05])
    probs = target_distribution(probs_in.log(), SamplingParams(min_p=0.2), [])  # threshold 0.12
    assert (probs > 0).tolist() == [True, True, False, False]


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 2.0])
    cold = target_distribution(logits, SamplingParams(temperature=0.5), [])
    assert torch.allclose(cold, torch.softmax(logits / 0.5, 0))


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_seed_fixes_the_draws():
    logits = torch.randn(1000)
    params = SamplingParams(temperature=1.0)
    probs = target_distribution(logits, params, [])
    draws = [torch.multinomial(probs, 5, generator=torch.Generator().manual_seed(3)).tolist() for _ in range(2)]
    assert draws[0] == draws[1]


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_values_are_named(kwargs, word):
    with pytest.raises(RequestError, match=word):
        SamplingParams(**kwargs)
