"""What a speculative decode step costs by the number of drafted nodes (fixed trees, the tuner off,
prompt lookup + Token Recycling), against a plain step: each prompt is decoded by every size in
turn, and the median step of each size is split into drafting, the forward and verification.

    .venv/bin/python benchmarks/scripts/step_cost.py --activations int8 --sizes 0 1 2 4 8
"""

import argparse
import time
from collections import defaultdict

import numpy as np
import torch

from tokensieve import LLM
from tokensieve.bench.spec import QUESTIONS, load_prompts
from tokensieve.config import SpeculativeConfig
from tokensieve.engine.engine import LLMEngine
from tokensieve.engine.runner import ModelRunner
from tokensieve.sampling_params import SamplingParams

PARTS = {"draft": (LLMEngine, "_draft"), "forward": (ModelRunner, "run"), "verify": (LLMEngine, "_verify")}


def timed(seconds: dict, label: str, function):
    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - began
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--activations", default="float32", choices=["float32", "int8"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    step_parts: dict[str, float] = {}
    for label, (cls, name) in PARTS.items():
        setattr(cls, name, timed(step_parts, label, getattr(cls, name)))
    plain = LLM(args.model, activations=args.activations)
    systems = {
        n: plain if n == 0 else plain.with_options(speculative=SpeculativeConfig(drafters="lookup,recycling", max_nodes=n, tune=False))
        for n in args.sizes
    }
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    steps: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for prompt in load_prompts(QUESTIONS, args.per_category):
        ids = plain.encode([{"role": "user", "content": prompt["text"]}])
        for n, llm in systems.items():
            engine = llm.engine
            request_id = engine.add_request(ids, params)
            seq = engine.sequence(request_id)
            while engine.has_unfinished():
                decoding = seq.num_output_tokens > 0
                step_parts.clear()
                began = time.perf_counter()
                engine.step()
                step_parts["step"] = time.perf_counter() - began
                if decoding and (n == 0 or "verify" in step_parts):  # a plain step, or one that verified a draft
                    for label, seconds in step_parts.items():
                        steps[n][label].append(seconds)
            engine.abort(request_id)
    plain_step = np.median(steps[args.sizes[0]]["step"])
    print(f"median decode step, {args.activations} activations, {args.per_category} prompt(s) per category, {args.max_tokens} tokens")
    print("| drafted nodes | step ms | vs plain | drafting ms | forward ms | verification ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        median = {label: 1000 * np.median(values) for label, values in steps[n].items()}
        print(f"| {n} | {median['step']:.2f} | {median['step'] / 1000 / plain_step:.2f}x | {median.get('draft', 0):.2f} | "
              f"{median['forward']:.2f} | {median.get('verify', 0):.2f} |")


if __name__ == "__main__":
    main()
