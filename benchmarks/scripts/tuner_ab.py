"""The tuner beside fixed tree sizes, decoding the same prompts in turn in one process: plain
decoding, the default tuned fused drafter (prompt lookup + Token Recycling), the same with Jacobi
lookahead added, and fixed trees (prompt lookup + Token Recycling, the tuner off). Each prompt runs
the systems in another order (a rotation), so that no system always follows the same one. Prints
decode speedup over plain (first token left out) and tokens per forward; every output is checked
against plain decoding.

    .venv/bin/python benchmarks/scripts/tuner_ab.py --activations int8 --per-category 2 --fixed 4
"""

import argparse
from collections import defaultdict

import torch

from tokensieve import LLM
from tokensieve.bench.spec import QUESTIONS, _run_ours, load_prompts
from tokensieve.config import DRAFTERS, SpeculativeConfig
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
        "tuned (default)": plain.with_options(speculative=SpeculativeConfig()),
        "tuned, with lookahead": plain.with_options(speculative=SpeculativeConfig(drafters=DRAFTERS)),
    }
    for n in args.fixed:
        systems[f"fixed {n}"] = plain.with_options(speculative=SpeculativeConfig(drafters="lookup,recycling", max_nodes=n, tune=False))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    decode_s, emitted, forwards = defaultdict(float), defaultdict(int), defaultdict(int)
    names = list(systems)
    for index, prompt in enumerate(load_prompts(QUESTIONS, args.per_category)):
        ids = plain.encode([{"role": "user", "content": prompt["text"]}])
        outputs = {}
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            tokens, seconds, first_s, decode_forwards = _run_ours(systems[name], ids, params)
            outputs[name] = tokens
            decode_s[name] += seconds - first_s
            emitted[name] += len(tokens) - 1
            forwards[name] += decode_forwards
        for name, tokens in outputs.items():
            if tokens != outputs["plain"]:
                raise SystemExit(f"{name}: output differs from plain decoding on question {prompt['id']}")
    print(f"{args.activations} activations, {args.per_category} prompt(s) per category, {args.max_tokens} tokens")
    print("| system | decode vs plain | tokens per forward |")
    print("|---|---:|---:|")
    for name in systems:
        print(f"| {name} | {decode_s['plain'] / decode_s[name]:.2f}x | {emitted[name] / forwards[name]:.2f} |")


if __name__ == "__main__":
    main()
