"""`bench cpu` without running the benchmark: its options, the contexts cut from text, the medians, the
ratios and targets on a made-up result, the table and plot, the fresh-process timing on tiny Python
children; and, when llama_cpp is importable, one short llama.cpp run on the packaged GGUF file."""

import importlib.util
import json
import sys
from argparse import Namespace

import pytest

from tokensieve.bench import cpu, cpu_llamacpp, cpu_processes
from tokensieve.bench import cpu_report as report
from tokensieve.cli import build_parser, main
from tokensieve.errors import ConfigError


def test_defaults_are_the_targets_settings():
    args = build_parser().parse_args(["bench", "cpu"])
    assert (args.contexts, args.threads, args.decode_tokens, args.repeats, args.n_ctx) == ([10, 1024, 3072], 2, 64, 3, 4096)
    assert args.activations is None  # the engine's default, not a choice of the benchmark
    assert args.model == "smollm2-135m" and args.out == "benchmarks/cpu"


def test_options_are_parsed():
    args = build_parser().parse_args(["bench", "cpu", "--contexts", "16", "32", "--decode-tokens", "4", "--repeats", "1",
                                      "--threads", "1", "--activations", "float32", "--n-ctx", "128", "--out", "x"])
    assert (args.contexts, args.decode_tokens, args.repeats, args.threads, args.activations, args.n_ctx, args.out) == (
        [16, 32], 4, 1, 1, "float32", 128, "x")


def _settings(**changes):
    values = {"contexts": [10, 1024], "decode_tokens": 64, "repeats": 3, "threads": 2, "n_ctx": 4096}
    return Namespace(**{**values, **changes})


def test_settings_that_cannot_run_are_clear_errors():
    cpu.check_settings(_settings())
    with pytest.raises(ConfigError, match="--n-ctx 1000 is too small: the longest context and its 65 new tokens need 1089"):
        cpu.check_settings(_settings(n_ctx=1000))
    with pytest.raises(ConfigError, match="--decode-tokens must be at least 1"):
        cpu.check_settings(_settings(decode_tokens=0))
    with pytest.raises(ConfigError, match="--contexts must be at least 1 token each"):
        cpu.check_settings(_settings(contexts=[0, 8]))


def _letters(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_a_context_is_the_texts_one_after_another_cut_to_its_length():
    texts = ["ab", "cd", "ef"]
    assert cpu.context_ids(_letters, texts, 3) == _letters("ab\n")
    assert cpu.context_ids(_letters, texts, 7) == _letters("ab\n\ncd\n")
    assert cpu.context_ids(_letters, texts, 12) == _letters("ab\n\ncd\n\nef\n\n")
    with pytest.raises(ConfigError, match="the prompt texts hold 12 tokens, fewer than the context of 13"):
        cpu.context_ids(_letters, texts, 13)


def test_spec_bench_texts_make_contexts_of_every_default_length():
    texts = cpu.spec_bench_texts()
    words = lambda text: [hash(w) for w in text.split()]  # noqa: E731
    short, long = cpu.context_ids(words, texts, 10), cpu.context_ids(words, texts, 3072)
    assert len(short) == 10 and len(long) == 3072 and long[:10] == short


def test_speed_row_takes_the_median_of_the_runs():
    row = cpu.speed_row(100, "tokensieve", [(0.1, 1.0), (0.3, 3.0), (0.2, 2.0)], decode_tokens=10)
    assert row["prefill_tok_s"] == pytest.approx(500.0) and row["decode_tok_s"] == pytest.approx(5.0)
    assert row["prefill_runs_s"] == [0.1, 0.3, 0.2] and row["decode_runs_s"] == [1.0, 3.0, 2.0]


def test_llamacpp_is_skipped_with_the_reason_and_how_to_install_it(monkeypatch, tmp_path):
    assert "is not a GGUF file" in cpu.llamacpp_skip_reason(tmp_path / "folder")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert cpu.llamacpp_skip_reason(tmp_path / "m.gguf") == (
        "llama_cpp is not importable: pip install 'tokensieve[llamacpp]' (it builds llama.cpp from source)")


def _result(with_llamacpp: bool = True) -> dict:
    """A made-up result: ours twice llama.cpp's prefill everywhere, decode 1.5x at 10 tokens and 1.2x at 1024."""
    speed = [{"context": 10, "engine": "tokensieve", "prefill_tok_s": 400.0, "decode_tok_s": 150.0},
             {"context": 1024, "engine": "tokensieve", "prefill_tok_s": 1000.0, "decode_tok_s": 60.0}]
    llama = [{"context": 10, "engine": "llama.cpp", "prefill_tok_s": 200.0, "decode_tok_s": 100.0},
             {"context": 1024, "engine": "llama.cpp", "prefill_tok_s": 500.0, "decode_tok_s": 50.0}]
    start = {"tokensieve": {"first_output_s": 1.5, "exit_s": 1.8}, "llama.cpp": {"first_output_s": 0.3, "exit_s": 0.4}}
    memory = {"tokensieve": {"peak_rss_mb": 400.0}, "llama.cpp": {"peak_rss_mb": 250.0}}
    if not with_llamacpp:
        start.pop("llama.cpp"), memory.pop("llama.cpp")
    result = {
        "command": "tokensieve bench cpu", "model": "smollm2-135m", "dtype": "float32", "activations": "int8",
        "threads": 2, "machine": "Test CPU, 2 CPUs", "date": "2026-12-04", "commit": "abc1234", "torch": "2.13.0",
        "transformers": "5.0.0", "llama_cpp_python": "0.3.36" if with_llamacpp else None, "native_kernels": True,
        "n_ctx": 4096, "n_batch": 512, "load_average": 0.1, "contexts": [10, 1024], "decode_tokens": 64, "repeats": 3,
        "skipped": [] if with_llamacpp else ["llama.cpp: llama_cpp is not importable"],
        "speed": [row for pair in zip(speed, llama) for row in (pair if with_llamacpp else pair[:1])],
        "cold_start": start, "peak_memory": memory,
    }
    result["targets"] = report.target_checks(result)
    return result


def test_ratios_and_targets_against_llamacpp():
    result = _result()
    assert report.speed_ratio(result, 10, "prefill_tok_s") == pytest.approx(2.0)
    assert report.speed_ratio(result, 1024, "decode_tok_s") == pytest.approx(1.2)
    assert report.process_ratio(result, "peak_memory", "peak_rss_mb") == pytest.approx(1.6)
    met = {check["target"]: check["met"] for check in result["targets"]}
    assert met == {"prefill, 10 tokens": True, "decode, 10 tokens": True, "prefill, 1024 tokens": True,
                   "decode, 1024 tokens": False, "cold start to the first token": True, "peak memory": False}


def test_without_llamacpp_only_the_cold_start_target_is_judged():
    result = _result(with_llamacpp=False)
    assert report.speed_ratio(result, 10, "decode_tok_s") is None
    assert {check["target"]: check["met"] for check in result["targets"]} == {
        "prefill, 10 tokens": None, "decode, 10 tokens": None, "prefill, 1024 tokens": None, "decode, 1024 tokens": None,
        "cold start to the first token": True, "peak memory": None}
    table = report.markdown(result)
    assert "Skipped: llama.cpp: llama_cpp is not importable." in table
    assert "| peak memory, MB | 400 | - | - |" in table
    assert "| decode, 10 tokens: >= 1.3x llama.cpp | - | not measured |" in table


def test_table_rows_per_context_and_engine_with_the_ratios_on_ours():
    table = report.markdown(_result())
    assert "| 1024 | tokensieve | 1000.0 | 60.0 | 2.00x | 1.20x |" in table
    assert "| 1024 | llama.cpp | 500.0 | 50.0 |  |  |" in table
    assert "| cold start to the first token, s | 1.50 | 0.30 | 5.00x |" in table
    assert "| decode, 1024 tokens: >= 1.3x llama.cpp | 1.20x | NO |" in table
    assert "| cold start to the first token: <= 2.0 s | 1.50 s | yes |" in table


def test_bench_report_writes_the_table_and_plot_again(tmp_path, capsys):
    (tmp_path / "cpu.json").write_text(json.dumps(_result()))
    assert main(["bench", "report", str(tmp_path)]) == 0
    png = (tmp_path / "cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "| 10 | tokensieve | 400.0 | 150.0 | 2.00x | 1.50x |" in (tmp_path / "cpu.md").read_text()
    assert str(tmp_path / "cpu.png") in capsys.readouterr().out


def test_child_commands():
    ours = cpu_processes.ours_first_token_command("m.gguf", 2, None)
    assert ours[1:] == ["-m", "tokensieve.cli", "generate", "Hi", "--model", "m.gguf", "--max-tokens", "1", "--threads", "2"]
    assert cpu_processes.ours_first_token_command("m.gguf", 2, "int8")[-2:] == ["--activations", "int8"]
    llama = cpu_processes.llamacpp_command("peak", "m.gguf", 4096, 2, 64)
    assert llama[1] == "-c" and llama[3] == cpu_llamacpp.__file__ and llama[4:] == ["peak", "m.gguf", "4096", "2", "64"]


def test_time_to_first_output_and_to_exit():
    first, exit_ = cpu_processes.time_to_first_output(
        [sys.executable, "-c", "import sys, time; sys.stdout.write('x'); sys.stdout.flush(); time.sleep(0.5)"])
    assert 0 < first and exit_ - first >= 0.45


def test_a_failing_child_is_a_clear_error():
    with pytest.raises(ConfigError, match="failed: .*no model here"):
        cpu_processes.time_to_first_output([sys.executable, "-c", "import sys; sys.exit('no model here')"])


def test_peak_rss_is_this_process_own():
    assert 10 * 1024**2 < cpu_llamacpp.peak_rss_bytes() < 64 * 1024**3


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama_cpp is not importable")
def test_llamacpp_prefills_and_decodes_the_packaged_gguf():
    from tokensieve.weights.loader import resolve_model_path

    gguf = str(resolve_model_path("smollm2-135m"))
    llm = cpu_llamacpp.load(gguf, n_ctx=64, threads=2)
    prefill_s, decode_s = cpu_llamacpp.timed_run(llm, list(range(100, 116)), decode_tokens=2)
    assert prefill_s > 0 and decode_s > 0
    peak_mb = cpu_processes.peak_memory_mb(cpu_processes.llamacpp_command("peak", gguf, 64, 2, 2), list(range(100, 116)))
    assert 20 < peak_mb < 2048
