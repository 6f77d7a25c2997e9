"""The tuner beside fixed tree sizes, decoding the same prompts in turn in one process: plain
decoding, the default tuned fused drafter, the tuner without Jacobi lookahead, and fixed trees
(prompt lookup + Token Recycling, the tuner off). Prints decode speedup over plain (first token left
out) and tokens per forward; every output is checked against plain decoding.

    .venv/bin/python benchmarks/scripts/tuner_ab.py --activations int8 --per-category 2 --fixed 4
"""

import argparse
from collections import defaultdict

import torch

from tokensieve import LLM
from tokensieve.bench.spec import QUESTIONS, _run_ours, load_prompts
from tokensieve.config import SpeculativeConfig
from tokensieve.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--fixed", type=int, nargs="*", default=[4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--activations", default="float32", choices=["float32", "int8"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plain = LLM(args.model, activations=args.activations)
    systems = {
        "plain": plain,
        "tuned, all drafters": plain.with_options(speculative=SpeculativeConfig()),
        "tuned, no lookahead": plain.with_options(speculative=SpeculativeConfig(drafters="lookup,recycling")),
    }
    for n in args.fixed:
        systems[f"fixed {n}"] = plain.with_options(speculative=SpeculativeConfig(drafters="lookup,recycling", max_nodes=n, tune=False))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    decode_s, emitted, forwards = defaultdict(float), defaultdict(int), defaultdict(int)
    for prompt in load_prompts(QUESTIONS, args.per_category):
        ids = plain.encode([{"role": "user", "content": prompt["text"]}])
        reference = None
        for name, llm in systems.items():
            tokens, seconds, first_s, decode_forwards = _run_ours(llm, ids, params)
            reference = tokens if reference is None else reference
            if tokens != reference:
                raise SystemExit(f"{name}: output differs from plain decoding on question {prompt['id']}")
            decode_s[name] += seconds - first_s
            emitted[name] += len(tokens) - 1
            forwards[name] += decode_forwards
    print(f"{args.activations} activations, {args.per_category} prompt(s) per category, {args.max_tokens} tokens")
    print("| system | decode vs plain | tokens per forward |")
    print("|---|---:|---:|")
    for name in systems:
        print(f"| {name} | {decode_s['plain'] / decode_s[name]:.2f}x | {emitted[name] / forwards[name]:.2f} |")


if __name__ == "__main__":
    main()
