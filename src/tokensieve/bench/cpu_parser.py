"""Command-line options of `tokensieve bench cpu`."""

from __future__ import annotations

from ..config import ACTIVATIONS
from ..weights.packaged import DEFAULT_MODEL
from .commands import benchmark_command


def add_cpu_parser(bench_sub) -> None:
    parser = bench_sub.add_parser(
        "cpu", help="prefill, decode, cold start and peak memory beside llama.cpp on the same GGUF file and threads")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="packaged alias or .gguf file (llama.cpp loads the same file)")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads of both engines (torch's; llama.cpp's n_threads and n_threads_batch)")
    parser.add_argument("--activations", default=None, choices=ACTIVATIONS, help="ours (default: the engine's default)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[10, 1024, 3072], help="prompt tokens, of Spec-Bench text")
    parser.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens timed after the first")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measure (the median is reported)")
    parser.add_argument("--n-ctx", type=int, default=4096,
                        help="context window of both engines (llama.cpp's n_ctx, our max_model_len)")
    parser.add_argument("--out", default="benchmarks/cpu", help="folder for cpu.json, cpu_cases.jsonl, cpu.md and cpu.png")
    parser.set_defaults(func=benchmark_command("tokensieve.bench.cpu", "run_cpu_benchmark"))
