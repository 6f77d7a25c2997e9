"""`tokensieve bench cpu`: our engine beside llama.cpp (llama-cpp-python, when it is installed) on the
same GGUF file, the same token ids and the same threads, batch 1, default settings.

In this process, the engines interleaved: prefill and decode tokens/s at each context (Spec-Bench text
cut to the length). In fresh processes, one engine at a time: cold start and peak memory
(cpu_processes.py). Every ratio is against llama.cpp measured in the same run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
from pathlib import Path

import torch

from ..errors import ConfigError
from ..llm import LLM
from ..weights.loader import resolve_model_path
from . import cpu_llamacpp, cpu_processes
from .cpu_report import LLAMACPP, OURS, markdown, speed_line, target_checks
from .plotting import require_matplotlib
from .provenance import engine_settings, package_version, run_info
from .report import write_report
from .spec import QUESTIONS
from .speed import ours_timed

LLAMACPP_INSTALL = "pip install 'tokensieve[llamacpp]' (it builds llama.cpp from source)"
WARMUP_TOKENS = 64


def spec_bench_texts() -> list[str]:
    """The first turn of every Spec-Bench question, in file order: real text to cut contexts from."""
    return [json.loads(line)["turns"][0] for line in QUESTIONS.read_text().splitlines()]


def context_ids(encode, texts: list[str], length: int) -> list[int]:
    """The first `length` token ids of the texts one after another, each followed by a blank line."""
    ids: list[int] = []
    for text in texts:
        ids += encode(text + "\n\n")
        if len(ids) >= length:
            return ids[:length]
    raise ConfigError(f"the prompt texts hold {len(ids)} tokens, fewer than the context of {length} asked for")


def check_settings(args) -> None:
    for name in ("decode_tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if min(args.contexts) < 1:
        raise ConfigError(f"--contexts must be at least 1 token each, got {args.contexts}")
    needed = max(args.contexts) + args.decode_tokens + 1
    if args.n_ctx < needed:
        raise ConfigError(f"--n-ctx {args.n_ctx} is too small: the longest context and its {args.decode_tokens + 1} "
                          f"new tokens need {needed}")


def llamacpp_skip_reason(gguf: Path) -> str | None:
    """Why llama.cpp cannot run beside us, or None when it can."""
    if gguf.suffix != ".gguf":
        return f"the model {gguf} is not a GGUF file, which llama.cpp needs"
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama_cpp is not importable: {LLAMACPP_INSTALL}"
    return None


def speed_row(context: int, engine: str, runs: list[tuple[float, float]], decode_tokens: int) -> dict:
    """Median rates over the runs' (prefill seconds, decode seconds)."""
    prefill, decode = [r[0] for r in runs], [r[1] for r in runs]
    return {"context": context, "engine": engine, "prefill_tok_s": context / statistics.median(prefill),
            "decode_tok_s": decode_tokens / statistics.median(decode), "prefill_runs_s": prefill, "decode_runs_s": decode}


def measure_speed(runs: dict, prompts: dict[int, list[int]], args, record) -> list[dict]:
    """Rows per (context, engine): each engine's `run(ids)` -> (prefill s, decode s), interleaved."""
    rows = []
    for length, ids in prompts.items():
        timings = {engine: [] for engine in runs}
        for _ in range(args.repeats):
            for engine, run in runs.items():
                timings[engine].append(run(ids))
        measured = [speed_row(length, engine, timings[engine], args.decode_tokens) for engine in runs]
        for row in measured:
            record("speed", row, speed_line({"speed": measured}, row))
        rows += measured
    return rows


def measure_processes(args, gguf: Path, engines: list[str], longest: list[int], record) -> tuple[dict, dict]:
    """Cold start and peak memory of each engine, each in fresh processes of its own."""
    first_token = {OURS: cpu_processes.ours_first_token_command(args.model, args.threads, args.activations)}
    peak = {OURS: cpu_processes.ours_peak_command(args.model, args.n_ctx, args.threads, args.decode_tokens,
                                                  args.activations)}
    if LLAMACPP in engines:
        first_token[LLAMACPP] = cpu_processes.llamacpp_command("first-token", gguf, args.n_ctx, args.threads)
        peak[LLAMACPP] = cpu_processes.llamacpp_command("peak", gguf, args.n_ctx, args.threads, args.decode_tokens)
    cold_start, peak_memory = {}, {}
    for engine, command in first_token.items():
        start = cold_start[engine] = cpu_processes.cold_start(command, args.repeats)
        record("cold_start", {"engine": engine, **start}, f"cold start, {engine}: {start['first_output_s']:.2f} s "
               f"to the first token, {start['exit_s']:.2f} s to the exit")
    for engine, command in peak.items():
        memory = peak_memory[engine] = {"peak_rss_mb": cpu_processes.peak_memory_mb(command, longest)}
        record("peak_memory", {"engine": engine, **memory}, f"peak memory, {engine}: {memory['peak_rss_mb']:.0f} MB")
    return cold_start, peak_memory


def run_cpu_benchmark(args) -> dict:
    require_matplotlib()
    check_settings(args)
    load_average = os.getloadavg()[0]
    if load_average > 0.5:
        print(f"warning: the 1-minute load average is {load_average:.2f}: other work on the CPUs skews the times",
              flush=True)
    torch.set_num_threads(args.threads)
    gguf = resolve_model_path(args.model)
    skip = llamacpp_skip_reason(gguf)
    if skip:
        print(f"skipping llama.cpp: {skip}", flush=True)
    # our defaults, but no prefix caching: every repeat must compute its prompt again, as llama.cpp's does
    options = {"activations": args.activations} if args.activations else {}
    llm = LLM(args.model, prefix_caching=False, max_model_len=args.n_ctx, **options)
    engine = llm.engine
    info = run_info(argparse.Namespace(**{**vars(args), "dtype": engine.config.dtype})) | engine_settings(engine)
    result = info | {
        "gguf": str(gguf), "llama_cpp_python": package_version("llama_cpp_python"),
        "native_kernels": engine.kernels is not None, "n_ctx": args.n_ctx, "n_batch": cpu_llamacpp.N_BATCH,
        "load_average": load_average, "contexts": args.contexts, "decode_tokens": args.decode_tokens,
        "repeats": args.repeats, "skipped": [f"llama.cpp: {skip}"] if skip else [],
    }
    print(f"{result['model']} ({gguf.name}), {result['activations']} activations, {result['threads']} threads, "
          f"{result['machine']}", flush=True)
    texts = spec_bench_texts()

    def encode(text: str) -> list[int]:
        return llm.tokenizer(text, add_special_tokens=False).input_ids

    prompts = {length: context_ids(encode, texts, length) for length in args.contexts}
    runs = {OURS: lambda ids: ours_timed(llm, torch.tensor([ids]), args.decode_tokens + 1)}
    if not skip:
        llama = cpu_llamacpp.load(str(gguf), args.n_ctx, args.threads)
        runs[LLAMACPP] = lambda ids: cpu_llamacpp.timed_run(llama, ids, args.decode_tokens)
    for run in runs.values():
        run(context_ids(encode, texts, WARMUP_TOKENS))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cpu_cases.jsonl", "w") as cases:  # each measure as soon as it is taken

        def record(kind: str, row: dict, line: str) -> None:
            cases.write(json.dumps({"kind": kind, **row}) + "\n")
            cases.flush()
            print(line, flush=True)

        result["speed"] = measure_speed(runs, prompts, args, record)
        result["cold_start"], result["peak_memory"] = measure_processes(
            args, gguf, list(runs), prompts[max(args.contexts)], record)
    result["targets"] = target_checks(result)
    write_report("cpu", result, out)
    print(markdown(result))
    return result
