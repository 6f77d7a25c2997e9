"""Command-line options of `tokensieve bench embed`."""

from __future__ import annotations

from ..merging.config import METHODS, METRICS, SCHEDULES
from ..weights.packaged import DEFAULT_ENCODER
from .commands import benchmark_command


def add_embed_parser(bench_sub) -> None:
    parser = bench_sub.add_parser(
        "embed", help="sentence embeddings/s beside sentence-transformers, and token merging's speed against fidelity")
    parser.add_argument("--model", default=DEFAULT_ENCODER, help="packaged alias or sentence-transformers folder")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (both systems run in this process)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 128, 256], help="tokens per text")
    parser.add_argument("--texts", type=int, default=128, help="texts per length")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.5, 0.7], help="fractions of tokens removed")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--start-layer", type=int, default=0, help="first layer that merges")
    parser.add_argument("--metrics", nargs="+", default=["hidden"], choices=METRICS,
                        help="what merging compares: hidden states after attention, or the attention keys")
    parser.add_argument("--proportional", nargs="+", default=["on"], choices=["on", "off"],
                        help="proportional attention (a merged token weighs as its size) on, off, or both")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of every system (the median is reported)")
    parser.add_argument("--out", default="benchmarks/embed", help="folder for embed.json, embed_cases.jsonl, embed.md and embed.png")
    parser.set_defaults(func=benchmark_command("tokensieve.bench.embed", "run_embed_benchmark"), dtype="float32", activations=None)
