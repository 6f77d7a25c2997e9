"""Logit warping and seeded sampling on hand-made logits."""

import pytest
import torch
from conftest import no_host_sync

from tokensieve import RequestError, SamplingParams
from tokensieve.engine.sampler import SamplingRows, penalised_logits, sample, splitmix64, target_distribution
from tokensieve.engine.sequence import Sequence


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
    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    params = [SamplingParams(repetition_penalty=2.0), SamplingParams()]
    rows = SamplingRows.of(params, [[0, 1, 1], [0]], [0, 0], 3, "cpu")
    assert penalised_logits(logits, rows).tolist() == [[1.0, -4.0, 1.0], [2.0, -2.0, 1.0]]


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


# ---- the batched sampler ---------------------------------------------------------------------------

MIXED = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.9),
    SamplingParams(temperature=1.0, min_p=0.05, repetition_penalty=1.5),
    SamplingParams(temperature=0, repetition_penalty=3.0),
    SamplingParams(temperature=0.9, top_k=40, top_p=0.8, min_p=0.01),
]


def _rows(params, seen, seeds, vocab=64):
    return SamplingRows.of(params, seen, seeds, vocab, "cpu")


def test_splitmix64_is_the_unsigned_algorithm_bit_for_bit():
    def reference(x: int) -> int:
        mask = 2**64 - 1
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    inputs = [0, 1, 12345, 2**62 + 7, 2**64 - 1, 0x9E3779B97F4A7C15]
    signed = torch.tensor([(x + 2**63) % 2**64 - 2**63 for x in inputs])
    assert [v % 2**64 for v in splitmix64(signed).tolist()] == [reference(x) for x in inputs]


def test_a_batch_warps_each_row_as_it_would_alone():
    logits = torch.randn(len(MIXED), 64, generator=torch.Generator().manual_seed(0)) * 3
    seen = [[1, 2, 3, 2], [4], [5, 6], [7, 8, 9, 7, 60], [10, 11], [12]]
    batched = sample(logits, _rows(MIXED, seen, list(range(6))))
    for row, params in enumerate(MIXED):
        alone = sample(logits[row : row + 1], _rows([params], [seen[row]], [row]))
        assert int(alone[0]) == int(batched[row])
        if params.greedy:  # the penalised argmax
            penalised = penalised_logits(logits[row : row + 1], _rows([params], [seen[row]], [row]))
            assert int(batched[row]) == int(penalised.argmax())


def test_draws_follow_the_target_distribution():
    """Chi-square of 6000 draws (one per position: fresh clocks each) against the warped distribution."""
    vocab, draws = 16, 6000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.8, top_k=12, top_p=0.95)
    probs = target_distribution(logits, params, [])
    rows = SamplingRows.of([params] * draws, [[0] * position for position in range(draws)], [7] * draws, vocab, "cpu")
    counts = torch.bincount(sample(logits.expand(draws, -1), rows), minlength=vocab).double()
    kept = probs > 0
    assert counts[~kept].sum() == 0  # nothing outside top-k / top-p
    expected = probs[kept].double() * draws
    statistic = ((counts[kept] - expected) ** 2 / expected).sum()
    dof = int(kept.sum()) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))
    assert p_value > 0.001


def test_a_draw_depends_on_the_seed_and_position_only():
    logits = torch.zeros(2, 1000)
    params = [SamplingParams(temperature=1.0)] * 2
    first = sample(logits, _rows(params, [[1, 2], [3]], [42, 5], 1000))
    again = sample(logits.flip(0), _rows(params[::-1], [[3], [9, 9]], [5, 42], 1000))  # same (seed, position) pairs
    assert first.tolist() == again.flip(0).tolist()
    others = [int(sample(logits[:1], _rows(params[:1], [[1, 2]], [seed], 1000))[0]) for seed in range(20)]
    assert len(set(others)) > 10  # a uniform draw over 1000 tokens


def test_the_sampler_never_reads_back_from_the_device():
    logits = torch.randn(len(MIXED), 64)
    rows = _rows(MIXED, [[1, 2]] * len(MIXED), list(range(len(MIXED))))
    with no_host_sync():
        tokens = sample(logits, rows)
    assert tokens.shape == (len(MIXED),)


def test_sample_tokens_reads_each_sequence_state():
    seqs = [Sequence(f"r{i}", [1, 2, 3], params, i, seed=i) for i, params in enumerate(MIXED)]
    logits = torch.randn(len(MIXED), 64, generator=torch.Generator().manual_seed(2))
    from tokensieve.engine.sampler import sample_tokens

    expected = sample(logits, _rows(MIXED, [[1, 2, 3]] * len(MIXED), list(range(len(MIXED))))).tolist()
    assert sample_tokens(logits, seqs) == expected
