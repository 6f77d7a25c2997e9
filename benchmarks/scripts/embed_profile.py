"""Where an encode() of 2 batches of 32 texts spends its time, ours (with or without merging) beside
sentence-transformers: torch.profiler's top operations, and the linears' GFLOP/s."""

from __future__ import annotations

import argparse

import torch

from tokensieve import Embedder, MergingConfig
from tokensieve.bench.embed import corpus_texts
from tokensieve.embedder import resolve_encoder_path


def profile(name: str, encode, flops: float | None) -> None:
    encode()
    with torch.profiler.profile() as prof:
        encode()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n{name}: {total / 1e6:.2f} s of operations")
    for event in events[:8]:
        print(f"  {event.key:55s} {event.self_cpu_time_total / 1e3:8.1f} ms {100 * event.self_cpu_time_total / total:5.1f}%")
    linear = sum(e.self_cpu_time_total for e in events if e.key in ("mkldnn::_linear_pointwise", "aten::addmm"))
    if flops:
        print(f"  the linears: {flops / (linear / 1e6) / 1e9:.0f} GFLOP/s (unmerged count of multiply-adds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--merging", default=None, choices=["tome", "pitome", "zero_tprune"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    embedder = Embedder()
    texts = corpus_texts(embedder, args.tokens, 64)
    cfg = embedder.model.config
    tokens = sum(len(ids) for ids in embedder.tokenize(texts))
    flops = 2 * tokens * cfg.num_layers * cfg.hidden_size * (4 * cfg.hidden_size + 2 * cfg.intermediate_size)
    profile("tokensieve, unmerged", lambda: embedder.encode(texts), flops)
    if args.merging:
        merged = embedder.with_merging(MergingConfig(args.merging, args.ratio))
        profile(f"tokensieve, {args.merging} {args.ratio}", lambda: merged.encode(texts), None)
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(resolve_encoder_path("all-minilm-l6-v2")), device="cpu")
    profile("sentence-transformers", lambda: reference.encode(texts, batch_size=32), flops)


if __name__ == "__main__":
    main()
