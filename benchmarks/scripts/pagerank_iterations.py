"""Zero-TPrune's PageRank on all-MiniLM-L6-v2: how far one iteration moves the scores (does the walk
converge?), and the embeddings and time with other iteration counts per third of the layers."""

from __future__ import annotations

import argparse
import time

import torch

import tokensieve.merging.zero_tprune as zero_tprune
from tokensieve import Embedder, MergingConfig
from tokensieve.bench.embed import corpus_texts, fidelity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--texts", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    embedder = Embedder()
    texts = corpus_texts(embedder, args.tokens, args.texts)
    unmerged = embedder.encode(texts, convert_to_tensor=True)
    merging = embedder.with_merging(MergingConfig("zero_tprune", args.ratio))

    steps = []
    importance = zero_tprune.importance

    def traced(attention, alive, iterations):
        weights = alive.to(attention.dtype)[:, None, :]
        scores = weights / weights.sum(-1, keepdim=True)
        for _ in range(iterations):
            new = (scores.unsqueeze(-2) @ attention).squeeze(-2) * weights
            steps.append(((new - scores).abs().amax() * alive.sum(1).max()).item())
            scores = new
        return importance(attention, alive, iterations)

    zero_tprune.importance, zero_tprune.pagerank_iterations = traced, lambda layer, num_layers: 30
    merging.encode(texts[:32])
    print("largest change of a score in each of 30 iterations, as a multiple of the mean score 1/n (first layer):")
    print(" ".join(f"{step:.2f}" for step in steps[1:31]))
    zero_tprune.importance = importance
    for counts in ((30, 5, 1), (10, 3, 1), (5, 2, 1), (3, 1, 1)):
        zero_tprune.pagerank_iterations = lambda layer, num_layers, c=counts: c[min(3 * layer // num_layers, 2)]
        start = time.perf_counter()
        vectors = merging.encode(texts, convert_to_tensor=True)
        seconds = time.perf_counter() - start
        scores = ", ".join(f"{name} {value:.4f}" for name, value in fidelity(vectors, unmerged).items())
        print(f"iterations {counts}: {seconds:.1f} s, {scores}")


if __name__ == "__main__":
    main()
