"""Tokens emitted per forward by a draft tree of fixed size (the tuner off), per Spec-Bench category:
what speculation could gain on this model if verifying more tokens cost nothing. Beside each size it
prints the most a drafted token may cost, as a fraction of a plain step, for the whole forward to
reach a target speedup: (tokens per forward / target - 1) / drafted tokens; and the decode speedup
over plain decoding that the fixed size really gave on this machine (time to first token left out).

    .venv/bin/python benchmarks/scripts/acceptance_curve.py --per-category 4 --max-tokens 256 --nodes 1 2 4 8 16 32

Greedy, one request at a time; the outputs are checked against plain decoding as in `bench spec`.
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from tokensieve import LLM
from tokensieve.bench.spec import QUESTIONS, _run_ours, load_prompts
from tokensieve.config import SpeculativeConfig
from tokensieve.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-category", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--drafters", default="lookup,recycling")
    parser.add_argument("--recycling-slots", type=int, default=SpeculativeConfig.recycling_slots,
                        help="nodes of Token Recycling's static tree")
    parser.add_argument(
        "--target", type=float, default=1.6, help="decode speedup (first token left out) to price a drafted token for"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--activations", default="float32", choices=["float32", "int8"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plain = LLM(args.model, activations=args.activations)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    prompts = load_prompts(QUESTIONS, args.per_category)
    requests = [(p["category"], plain.encode([{"role": "user", "content": p["text"]}])) for p in prompts]
    plain_runs = [_run_ours(plain, ids, params) for _, ids in requests]
    plain_decode_s = sum(seconds - first_s for _, seconds, first_s, _ in plain_runs)
    curve: dict[int, dict[str, float]] = {}
    speedup: dict[int, float] = {}
    for nodes in args.nodes:
        spec = plain.with_options(speculative=SpeculativeConfig(
            drafters=args.drafters, max_nodes=nodes, tune=False, recycling_slots=args.recycling_slots
        ))
        emitted, forwards, decode_s = defaultdict(int), defaultdict(int), 0.0
        for (category, ids), (reference, *_) in zip(requests, plain_runs):
            tokens, seconds, first_s, decode_forwards = _run_ours(spec, ids, params)
            decode_s += seconds - first_s
            if tokens != reference:
                raise SystemExit(f"{category}: speculative output differs from plain decoding at {nodes} nodes")
            for key in (category, "overall"):
                emitted[key] += len(tokens) - 1
                forwards[key] += decode_forwards
        curve[nodes] = {key: emitted[key] / forwards[key] for key in emitted}
        speedup[nodes] = plain_decode_s / decode_s
        overall = curve[nodes]["overall"]
        print(f"{nodes} nodes: {overall:.2f} tokens per forward, {speedup[nodes]:.2f}x decode vs plain", flush=True)
    categories = [key for key in curve[args.nodes[0]] if key != "overall"] + ["overall"]
    print(f"\nTokens per forward by drafted nodes ({args.drafters}; {args.per_category} prompts per category, "
          f"{args.max_tokens} new tokens)\n")
    print("| category | " + " | ".join(str(n) for n in args.nodes) + " |")
    print("|---|" + "---:|" * len(args.nodes))
    for category in categories:
        print(f"| {category} | " + " | ".join(f"{curve[n][category]:.2f}" for n in args.nodes) + " |")
    budget = lambda n: (curve[n]["overall"] / args.target - 1) / n  # noqa: E731
    print(f"| most a drafted token may cost for {args.target}x decode speed (x plain step) | "
          + " | ".join(f"{budget(n):.3f}" for n in args.nodes) + " |")
    print("| decode vs plain, measured | " + " | ".join(f"{speedup[n]:.2f}x" for n in args.nodes) + " |")
    if args.out:
        settings = vars(args) | {"out": str(args.out)}
        result = {"settings": settings, "tokens_per_forward": curve, "decode_speedup_vs_plain": speedup}
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
