"""What this CPU's float32 matmul can do at best (PyTorch's own, oneDNN/MKL), and what that puts
as a floor under the cost of one more token in a forward of the given model: its linears' weights
times one row, at that rate. The engine's quantized kernel cannot beat a dense float32 GEMM's
multiply-adds per second, so no drafted token can cost less than this.

    .venv/bin/python benchmarks/scripts/float32_peak.py
"""

import argparse
import time

import torch

from tokensieve import LLM
from tokensieve.models.llama import Linear


def multiply_adds_per_second(rows: int, inner: int, outputs: int, repeats: int = 20) -> float:
    a, b = torch.randn(rows, inner), torch.randn(outputs, inner)
    for _ in range(3):
        a @ b.T
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        a @ b.T
        best = min(best, time.perf_counter() - began)
    return rows * inner * outputs / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = LLM(args.model).engine.model
    per_row = sum(m.weight.numel() for m in model.modules() if isinstance(m, Linear))
    outputs, inner = model.layers[0].mlp.gate_up_proj.weight.shape  # the model's biggest layer matmul
    rates = {rows: multiply_adds_per_second(rows, inner, outputs) for rows in (1, 8, 16, 64, 512)}
    print(f"{args.threads} threads, float32 GEMM of [rows, {inner}] x [{inner}, {outputs}]:")
    for rows, rate in rates.items():
        print(f"  {rows:4d} rows: {rate / 1e9:6.1f} G multiply-adds/s")
    peak = max(rates.values())
    print(f"{args.model}: {per_row / 1e6:.1f}M multiply-adds per token in its linears (lm_head included); "
          f"at the best rate above one more token costs at least {per_row / peak * 1000:.2f} ms")


if __name__ == "__main__":
    main()
