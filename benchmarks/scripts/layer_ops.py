"""Greedy decoding with the native layer ops (RMSNorm, rotary, SwiGLU, KV store: kernels/layer_ops.cpp)
and with their PyTorch versions, alternated request by request in one process; prints each side's
median decode tokens/s and their ratio. --ops swiglu switches SwiGLU's alone; --nodes N also decodes
speculatively with fixed trees of N drafted nodes (prompt lookup + Token Recycling, the tuner off):

    .venv/bin/python benchmarks/scripts/layer_ops.py --rounds 6 [--activations int8] [--ops swiglu] [--nodes 8]
"""

import argparse
import statistics

import torch

from tokensieve import LLM
from tokensieve.bench.spec import _run_ours
from tokensieve.config import SpeculativeConfig
from tokensieve.models.llama import Attention, RMSNorm, SwiGLU
from tokensieve.sampling_params import SamplingParams

OPS = {"norm": RMSNorm, "rotary": Attention, "swiglu": SwiGLU}  # the KV store goes with rotary


def use_layer_ops(llm: LLM, kernels, ops: list[str]) -> None:
    classes = tuple(OPS[op] for op in ops)
    for module in llm.engine.model.modules():
        if isinstance(module, classes):
            module.kernels = kernels
    if "rotary" in ops:
        llm.engine.pool.kernels = kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--activations", default="float32", choices=["float32", "int8"])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--nodes", type=int, default=0, help="also decode speculatively with this many drafted nodes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plain = LLM(args.model, activations=args.activations)
    systems = {"plain": plain}
    if args.nodes:
        config = SpeculativeConfig(drafters="lookup,recycling", max_nodes=args.nodes, tune=False)
        systems[f"{args.nodes} nodes"] = plain.with_options(speculative=config)
    kernels = plain.engine.kernels
    ids = plain.encode([{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    speeds: dict[tuple[str, str], list[float]] = {}
    outputs = {}
    for _ in range(args.rounds + 1):  # the first round warms up
        for system, llm in systems.items():
            for side in ("native", "pytorch"):
                use_layer_ops(llm, kernels if side == "native" else None, args.ops)
                tokens, seconds, first_s, _ = _run_ours(llm, ids, params)
                speeds.setdefault((system, side), []).append((len(tokens) - 1) / (seconds - first_s))
                outputs[system, side] = tokens
    median = {key: statistics.median(values[1:]) for key, values in speeds.items()}
    print(f"{args.activations} activations, native {' '.join(args.ops)} against PyTorch's, {args.max_tokens} tokens, "
          f"median of {args.rounds} rounds")
    for system in systems:
        native, pytorch = median[system, "native"], median[system, "pytorch"]
        same = outputs[system, "native"] == outputs[system, "pytorch"]
        print(f"{system}: decode tokens/s native {native:.1f}, PyTorch {pytorch:.1f}: {native / pytorch:.2f}x; same tokens: {same}")
    if args.nodes:
        for side in ("native", "pytorch"):
            print(f"{args.nodes} nodes over plain, {side} ops: {median[f'{args.nodes} nodes', side] / median['plain', side]:.2f}x")


if __name__ == "__main__":
    main()
