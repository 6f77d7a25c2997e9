"""Plain greedy decoding with the native layer ops (RMSNorm, rotary, SwiGLU, KV store: kernels/layer_ops.cpp)
and with their PyTorch versions, alternated request by request in one process; prints each side's
median decode tokens/s and their ratio:

    .venv/bin/python benchmarks/scripts/layer_ops.py --rounds 6 [--activations int8]
"""

import argparse
import statistics

import torch

from tokensieve import LLM
from tokensieve.bench.spec import _run_ours
from tokensieve.models.llama import Attention, RMSNorm, SwiGLU
from tokensieve.sampling_params import SamplingParams


def use_layer_ops(llm: LLM, kernels) -> None:
    for module in llm.engine.model.modules():
        if isinstance(module, (RMSNorm, Attention, SwiGLU)):
            module.kernels = kernels
    llm.engine.pool.kernels = kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--activations", default="float32", choices=["float32", "int8"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, activations=args.activations)
    kernels = llm.engine.kernels
    ids = llm.encode([{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    speeds: dict[str, list[float]] = {"native": [], "pytorch": []}
    outputs = {}
    for _ in range(args.rounds + 1):  # the first round warms up
        for side in speeds:
            use_layer_ops(llm, kernels if side == "native" else None)
            tokens, seconds, first_s, _ = _run_ours(llm, ids, params)
            speeds[side].append((len(tokens) - 1) / (seconds - first_s))
            outputs[side] = tokens
    native, pytorch = (statistics.median(speeds[side][1:]) for side in speeds)
    print(f"{args.activations} activations, {args.max_tokens} tokens, median of {args.rounds} rounds")
    print(f"decode tokens/s: native layer ops {native:.1f}, PyTorch {pytorch:.1f}: {native / pytorch:.2f}x")
    print(f"same tokens: {outputs['native'] == outputs['pytorch']}")


if __name__ == "__main__":
    main()
