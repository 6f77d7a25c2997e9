"""The command line, driven in-process on the shared model."""

import io
import json
import sys

import pytest

from tokensieve import cli


@pytest.fixture
def shared_model(monkeypatch, llm):
    monkeypatch.setattr(cli, "_load", lambda args: llm)


def test_generate_streams_text_and_stats(shared_model, capsys, llm):
    code = cli.main(["generate", "The capital of France is", "--max-tokens", "8", "--stats"])
    captured = capsys.readouterr()
    assert code == 0
    expected = llm.generate("The capital of France is", cli._sampling_params(
        cli.build_parser().parse_args(["generate", "x", "--max-tokens", "8"])))[0].text
    assert captured.out.strip() == expected.strip()
    assert "tok/s" in captured.err and "8 generated" in captured.err
    assert "float32 activations, float32 KV" in captured.err  # what it runs (the shared model: the reference mode)
    peak = float(captured.err.split("peak memory ")[1].split(" MB")[0])
    assert 100 < peak < 100_000  # this process's peak, in MB


def test_chat_keeps_history_and_recovers_from_errors(shared_model, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2+2?\n/reset\nSay hi.\n/exit\n"))
    code = cli.main(["chat", "--max-tokens", "20"])
    captured = capsys.readouterr()
    assert code == 0
    assert "4" in captured.out


def test_bad_arguments_give_a_clear_error(capsys):
    assert cli.main(["generate", "hi", "--model", "/no/such/model.gguf"]) == 2
    assert "not found" in capsys.readouterr().err


def test_invalid_sampling_value_is_reported(shared_model, capsys):
    assert cli.main(["generate", "hi", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_kv_policy_options_are_checked_before_loading(capsys):
    assert cli.main(["generate", "hi", "--kv-policy", "h2o"]) == 2
    assert "needs exactly one of budget or keep_ratio" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "hi", "--kv-policy", "lru"])
    assert "invalid choice: 'lru'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    ["generate", "hi", "--activations", "int8", "--dtype", "bfloat16"],
    ["bench", "spec", "--activations", "int8", "--dtype", "bfloat16"],
    ["bench", "speed", "--activations", "int8", "--no-native-kernels"],
    ["bench", "longctx", "--activations", "int8", "--dtype", "bfloat16"],
])
def test_int8_activations_that_cannot_run_are_reported_before_loading(command, capsys):
    """Every command reports settings that do not fit together as an error, not a traceback."""
    assert cli.main(command) == 2
    assert "activations='int8' runs in the native CPU kernels" in capsys.readouterr().err


def test_a_malformed_device_is_reported(capsys):
    assert cli.main(["generate", "hi", "--device", "gpu0"]) == 2
    assert "device must be a torch device" in capsys.readouterr().err


def test_kv_policy_options_build_the_policy_config():
    args = cli.build_parser().parse_args(["generate", "x", "--kv-policy", "snapkv", "--kv-budget", "64", "--kv-allocation", "pyramid"])
    config = cli._kv_policy(args)
    assert (config.name, config.budget, config.allocation) == ("snapkv", 64, "pyramid")


def test_speculative_generation_prints_the_plain_greedy_text(shared_model, capsys, llm):
    code = cli.main(["generate", "one two three one two three one two", "--max-tokens", "12", "--speculative"])
    captured = capsys.readouterr()
    assert code == 0
    plain = llm.generate("one two three one two three one two", cli._sampling_params(
        cli.build_parser().parse_args(["generate", "x", "--max-tokens", "12"])))[0].text
    assert captured.out.strip() == plain.strip()


def test_speculative_options_build_the_config(capsys):
    args = cli.build_parser().parse_args(["generate", "x", "--speculative", "--drafters", "lookup", "--max-draft-nodes", "4"])
    config = cli._speculative(args)
    assert (config.drafters, config.max_nodes) == (("lookup",), 4)
    assert cli._speculative(cli.build_parser().parse_args(["generate", "x"])) is None
    assert cli.main(["generate", "hi", "--speculative", "--drafters", "eagle"]) == 2
    assert "unknown drafter 'eagle'" in capsys.readouterr().err


def test_bench_spec_end_to_end_writes_json_and_markdown(tmp_path):
    questions = tmp_path / "question.jsonl"
    lines = [
        {"question_id": 1, "category": "summarization", "turns": ["Repeat: the cat sat on the mat. The cat sat on the mat."]},
        {"question_id": 2, "category": "summarization", "turns": ["Not taken: one per category."]},
        {"question_id": 3, "category": "qa", "turns": ["What is the capital of France?"]},
    ]
    questions.write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "spec"
    code = cli.main(["bench", "spec", "--questions", str(questions), "--per-category", "1", "--max-tokens", "12",
                     "--no-transformers", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "spec.json").read_text())
    assert [case["id"] for case in result["cases"]] == [1, 3]
    assert all(case["identical"] for case in result["cases"])
    summary = result["summary"]
    assert set(summary) == {"summarization", "qa", "overall"}
    assert summary["overall"]["tokens_per_step"] >= 1.0
    assert all(0 < case["spec_first_s"] <= case["spec_s"] for case in result["cases"])
    assert summary["overall"]["decode_speedup_vs_plain"] > 0
    assert "| summarization | 1 |" in (out / "spec.md").read_text()
