"""Forward latency by number of drafted tokens (batch 1) at a chosen context, through the engine's
own latency probe (the grid timed round after round, medians), and its ratio to a plain step:

    .venv/bin/python benchmarks/scripts/forward_latency.py --context 800 --rounds 25 [--activations int8]
"""

import argparse

import torch

from tokensieve import LLM
from tokensieve.engine.latency_probe import LatencyProbe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--activations", default="float32", choices=["float32", "int8"])
    parser.add_argument("--grid", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = LLM(args.model, activations=args.activations).engine
    probe = LatencyProbe(engine.runner, engine.block_manager, engine.model.config.vocab_size, engine.max_model_len, args.rounds)
    seconds = probe(1, args.grid, args.context)
    plain = seconds[args.grid.index(0)] if 0 in args.grid else seconds[0]
    print(f"context {args.context}, batch 1, {args.activations} activations, median of {args.rounds} rounds")
    print("| drafted tokens | " + " | ".join(str(d) for d in args.grid) + " |")
    print("|---|" + "---:|" * len(args.grid))
    print("| forward ms | " + " | ".join(f"{s * 1000:.1f}" for s in seconds) + " |")
    print("| vs plain step | " + " | ".join(f"{s / plain:.2f}x" for s in seconds) + " |")


if __name__ == "__main__":
    main()
