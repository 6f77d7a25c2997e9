"""`bench longctx`: seeded cases of the requested length with their answers inside, scoring, the
Pareto front, and a small end-to-end run that writes JSON, Markdown and a PNG."""

import json
from types import SimpleNamespace

import pytest
import torch

from tokensieve.bench.longctx_report import pareto_front
from tokensieve.bench.longctx_systems import KVPRESS_CLASSES, KVPRESSES, Answer, make_press, score
from tokensieve.bench.longctx_tasks import PERPLEXITY_TOKENS, TASKS, Case, CaseMaker
from tokensieve.cli import main


@pytest.fixture(scope="module")
def maker(llm):
    return CaseMaker(llm.tokenizer, seed=0)


@pytest.mark.parametrize("task", TASKS)
def test_cases_have_the_requested_length_and_hold_their_answers(maker, llm, task):
    case = maker.make(task, 2048, 0)
    total = len(case.context_ids) + len(case.question_ids)
    assert 0.9 * 2048 <= total <= 2048
    context = llm.tokenizer.decode(case.context_ids)
    if task == "perplexity":
        assert len(case.question_ids) == PERPLEXITY_TOKENS and not case.answers
    else:
        assert case.answers and all(answer in context for answer in case.answers)
    again = maker.make(task, 2048, 0)
    assert again.context_ids == case.context_ids and again.question_ids == case.question_ids
    assert maker.make(task, 2048, 1).context_ids != case.context_ids


def test_unknown_task_is_a_clear_error(maker):
    with pytest.raises(ValueError, match="unknown long-context task 'sudoku'"):
        maker.make("sudoku", 2048, 0)


def test_score_counts_whole_answers_only():
    case = Case("niah_multivalue", 2048, 0, [], [], answers=["1234567", "7654321"])
    assert score(case, Answer("The numbers are 1234567 and 17654321.", None, 1.0, None, 0, None)) == 0.5


def test_pareto_front_keeps_points_nothing_beats():
    points = [(10, 0.5), (20, 0.4), (30, 0.9), (5, 0.1), (30, 0.2)]
    assert pareto_front(points) == [(5, 0.1), (10, 0.5), (30, 0.9)]


def test_bench_longctx_end_to_end_writes_json_markdown_and_plot(tmp_path):
    code = main([
        "bench", "longctx", "--tasks", "niah_single", "perplexity", "--lengths", "640", "--cases", "1",
        "--policies", "streaming_llm", "--keep-ratios", "0.5", "--no-transformers", "--out", str(tmp_path),
        "--kv-dtypes", "int8", "--quantized-policies", "streaming_llm",
    ])
    assert code == 0
    result = json.loads((tmp_path / "longctx.json").read_text())
    assert result["setting"] == "query-agnostic"
    methods = {(row["method"], row["task"]) for row in result["cases"]}
    methods_run = ("full@all", "quest@0.125x", "streaming_llm@0.5x", "full@all+int8", "streaming_llm@0.5x+int8")
    assert methods == {(m, t) for m in methods_run for t in ("niah_single", "perplexity")}
    full_kv = next(r for r in result["cases"] if r["method"] == "full@all" and r["task"] == "niah_single")["kv_bytes"]
    half_kv = next(r for r in result["cases"] if r["method"] == "streaming_llm@0.5x" and r["task"] == "niah_single")["kv_bytes"]
    assert half_kv < 0.7 * full_kv  # half the context evicted: the pool really holds less
    int8_kv = next(r for r in result["cases"] if r["method"] == "full@all+int8" and r["task"] == "niah_single")["kv_bytes"]
    assert int8_kv < 0.7 * full_kv  # int8 codes beside the float16 default
    assert "## niah_single, 640 tokens" in (tmp_path / "longctx.md").read_text()
    assert (tmp_path / "longctx.png").read_bytes()[:4] == b"\x89PNG"
    # the same run, as if stopped during its last case: `bench report` reports the cases every system finished
    for name in ("longctx.json", "longctx.md", "longctx.png"):
        (tmp_path / name).unlink()
    lines = (tmp_path / "longctx_cases.jsonl").read_text().splitlines()
    (tmp_path / "longctx_cases.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    assert main(["bench", "report", str(tmp_path)]) == 0
    table = (tmp_path / "longctx.md").read_text()
    assert "cut short after 1 of 2 cases" in table and "niah_single, 640 tokens (1 cases)" in table and "### perplexity" not in table
    assert json.loads((tmp_path / "longctx.json").read_text())["cases"] == result["cases"][: len(methods_run)]


def test_an_interrupted_run_reports_the_cases_every_system_finished(tmp_path, monkeypatch):
    from tokensieve.bench.longctx_systems import OursSystem

    def answer(self, case):  # the third answer (the second case's first system) is interrupted
        try:
            return next(answers)
        except StopIteration:
            raise KeyboardInterrupt from None

    monkeypatch.setattr(OursSystem, "answer", answer)
    answers = iter([Answer("1234567", None, 0.1, 10.0, 1024, 2048)] * 2)
    assert main(["bench", "longctx", "--tasks", "niah_single", "--lengths", "640", "--cases", "2", "--policies",
                 "--selections", "0.5", "--kv-dtypes", "--no-transformers", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "longctx.json").read_text())
    assert [(row["method"], row["case"]) for row in result["cases"]] == [("full@all", 0), ("quest@0.5x", 0)]
    assert result["cut_short"] == "cut short after 1 of 2 cases"


def test_every_kvpress_counterpart_is_made_with_the_share_to_remove():
    made = {}

    def press_class(name):
        return lambda **kwargs: made.setdefault(name, kwargs) and (name, kwargs)

    def duo_press(**kwargs):
        made["DuoAttentionPress"] = kwargs
        return SimpleNamespace()

    kvpress = SimpleNamespace(**{cls: press_class(cls) for cls in KVPRESS_CLASSES.values()},
                              DuoAttentionPress=duo_press, AdaKVPress=press_class("AdaKVPress"))
    head_scores = torch.tensor([[0.5, 0.01], [0.02, 0.3]])
    presses = {name: make_press(kvpress, name, 0.25, head_scores) for name in KVPRESSES}
    assert made["SnapKVPress"] == {"compression_ratio": 0.75} and made["KVzipPress"] == {"compression_ratio": 0.75}
    assert made["DuoAttentionPress"] == {"head_compression_ratio": 0.75}
    duo = presses["duo_attention"]  # three of the four heads stream: all but the best-scoring one
    assert duo.streaming_mask.tolist() == [[False, True], [True, True]] and (duo.sink_size, duo.recent_size) == (128, 256)
    assert made["AdaKVPress"]["press"] == ("ExpectedAttentionPress", {"compression_ratio": 0.75})
