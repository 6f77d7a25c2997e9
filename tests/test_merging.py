"""Token merging between encoder layers: the plan, the merge, padding, and each method on the real model."""

import pytest
import torch

from tokensieve.errors import ConfigError
from tokensieve.merging import MergingConfig, make_reducer
from tokensieve.merging.tokens import merge, mergeable_mask
from tokensieve.merging.zero_tprune import importance
from tokensieve.pooling import pool

METHODS = ("tome", "pitome", "zero_tprune")


def test_plan_removes_each_rows_share_exactly_over_the_layers():
    mergeable = torch.tensor([254, 10, 0])
    for schedule in ("constant", "decreasing"):
        plan = MergingConfig("tome", 0.5, start_layer=1, schedule=schedule).plan(6, mergeable)
        assert plan.shape == (6, 3) and not plan[0].any()
        assert plan.sum(0).tolist() == [127, 5, 0]
    decreasing = MergingConfig("tome", 0.6, schedule="decreasing").plan(6, torch.tensor([200]))[:, 0]
    assert decreasing.tolist() == sorted(decreasing.tolist(), reverse=True) and decreasing[0] > decreasing[-1]


@pytest.mark.parametrize("settings, message", [
    (dict(method="bogus"), "unknown merging method"), (dict(ratio=1.0), "ratio"), (dict(ratio=-0.1), "ratio"),
    (dict(start_layer=-1), "start_layer"), (dict(schedule="wavy"), "schedule"), (dict(metric="values"), "metric"),
])
def test_bad_settings_are_clear_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        MergingConfig(**settings)


def test_start_layer_beyond_the_model_is_an_error():
    with pytest.raises(ConfigError, match="beyond"):
        MergingConfig(start_layer=6).plan(6, torch.tensor([10]))


def test_mergeable_tokens_exclude_each_rows_cls_sep_and_pads():
    size = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert mergeable_mask(size).tolist() == [[False, True, True, True, False], [False, True, False, False, False]]


def test_merge_is_a_size_weighted_average_and_keeps_rows_in_order():
    x = torch.tensor([[[0.0], [1.0], [4.0], [10.0], [7.0]]])
    size = torch.tensor([[1.0, 3.0, 1.0, 1.0, 0.0]])
    sources = torch.tensor([[False, True, False, False, False]])
    destination = torch.tensor([[0, 2, 0, 0, 0]])
    merged_x, merged_size = merge(x, size, sources, destination)
    assert merged_size.tolist() == [[1.0, 4.0, 1.0]]
    assert merged_x[0, :, 0].tolist() == pytest.approx([0.0, (3 * 1 + 4) / 4, 10.0])


def test_size_weighted_pooling_is_the_mean_before_and_after_a_merge():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 4, generator=generator)
    size = torch.tensor([[1.0] * 7, [1.0] * 5 + [0.0] * 2])
    plain_mean = torch.stack([x[0].mean(0), x[1, :5].mean(0)])
    assert torch.allclose(pool(x, size, "mean_tokens"), plain_mean, atol=1e-6)
    sources = torch.tensor([[False, True, True, False, False, True, False], [False, False, True, True, False, False, False]])
    destination = torch.tensor([[0, 3, 4, 0, 0, 3, 0], [0, 0, 1, 1, 0, 0, 0]])  # never into a source
    merged_x, merged_size = merge(x, size, sources, destination)
    assert merged_x.shape[1] == 4 and (merged_size > 0).sum(1).tolist() == [4, 3]
    assert torch.allclose(pool(merged_x, merged_size, "mean_tokens"), plain_mean, atol=1e-5)


def test_pagerank_favours_the_token_everyone_attends_to():
    attention = torch.tensor([[0.1, 0.8, 0.1], [0.2, 0.6, 0.2], [0.1, 0.8, 0.1]])[None, None]
    scores = importance(attention, torch.ones(1, 3, dtype=torch.bool), iterations=20)
    assert scores.argmax().item() == 1
    dead = importance(attention, torch.tensor([[True, True, False]]), iterations=5)
    assert dead[0, 2] == 0


@pytest.fixture(scope="module")
def embedder():
    from tokensieve import Embedder

    return Embedder()


TEXTS = [
    "A short one.",
    "The lighthouse keeper climbed the stairs every evening to light the lamp, " * 6,
    "Quarterly revenue rose by four percent while costs fell, and the board approved a new plan. " * 3,
    "Why is the sky blue during the day and red at sunset?",
]


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_gives_each_text_what_it_gets_alone(embedder, method):
    merging = embedder.with_merging(MergingConfig(method, 0.5))
    batched = merging.encode(TEXTS, convert_to_tensor=True)
    alone = torch.stack([merging.encode(text, convert_to_tensor=True) for text in TEXTS])
    assert torch.nn.functional.cosine_similarity(batched, alone).min() > 0.99999
    unmerged = embedder.encode(TEXTS, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(batched, unmerged).min() > 0.8  # merged, yet the same meaning
    assert not torch.allclose(batched[1:3], unmerged[1:3], atol=1e-3)  # and the long texts did merge


@pytest.mark.parametrize("method", METHODS)
def test_pads_never_change_a_result(embedder, method):
    ids = embedder.tokenize([TEXTS[1]])[0]
    model, config = embedder.model, MergingConfig(method, 0.5)
    results = []
    for pads in (0, 9):
        token_ids = torch.tensor([ids + [0] * pads])
        size = torch.tensor([[1.0] * len(ids) + [0.0] * pads])
        hidden, final_size = model(token_ids, size, make_reducer(config, 6, size))
        if method != "zero_tprune":  # pruning drops weight; merging keeps all of it
            assert final_size.sum() == len(ids)
        results.append(pool(hidden, final_size, "mean_tokens"))
    assert torch.allclose(results[0], results[1], atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_ratio_zero_is_merging_off(embedder, method):
    off = embedder.encode(TEXTS, convert_to_tensor=True)
    for proportional in (True, False):
        config = MergingConfig(method, 0.0, proportional_attention=proportional)
        assert torch.equal(embedder.with_merging(config).encode(TEXTS, convert_to_tensor=True), off)


def test_proportional_attention_weighs_a_merged_token_by_its_size(embedder):
    on, off = (embedder.with_merging(MergingConfig("tome", 0.5, proportional_attention=p)).encode(TEXTS[1:3], convert_to_tensor=True)
               for p in (True, False))
    unmerged = embedder.encode(TEXTS[1:3], convert_to_tensor=True)
    assert not torch.allclose(on, off, atol=1e-4)
    assert (torch.nn.functional.cosine_similarity(on, unmerged) > torch.nn.functional.cosine_similarity(off, unmerged)).all()


@pytest.mark.parametrize("method", METHODS)
def test_each_method_removes_the_planned_tokens(embedder, method):
    ids = embedder.tokenize([TEXTS[1]])[0]
    size = torch.ones(1, len(ids))
    config = MergingConfig(method, 0.4, schedule="decreasing")
    reducer = make_reducer(config, 6, size)
    hidden, final_size = embedder.model(torch.tensor([ids]), size, reducer)
    assert hidden.shape[1] == len(ids) - int(reducer.plan.sum())
    assert (final_size > 0).all()
    if method != "zero_tprune":  # merges keep every token's weight; pruning drops it
        assert final_size.sum().item() == len(ids)
