"""Decode speed and KV bytes with a quantized KV pool (int8, int4) against float caches, on one long
prompt (4,000 tokens of Spec-Bench text by default) on the default model, 2 threads, int8 activations;
64 greedy tokens, median of 3 runs each, interleaved. Prints tokens/s, KV bytes allocated at the end of
the prompt and the greedy tokens shared with the float32 cache.

    .venv/bin/python benchmarks/scripts/kv_quant_decode.py [tokens]
"""

import statistics
import sys

import torch

from tokensieve import LLM, SamplingParams
from tokensieve.bench.cpu import context_ids, spec_bench_texts

torch.set_num_threads(2)
tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
reference = LLM("smollm2-135m", prefix_caching=False, kv_dtype="float32")
ids = context_ids(lambda t: reference.tokenizer(t, add_special_tokens=False).input_ids, spec_bench_texts(), tokens)
systems = {kv: reference.with_options(kv_dtype=kv) for kv in ("float32", "float16", "int8", "int4")}
params = SamplingParams(max_tokens=65, temperature=0, ignore_eos=True)
rates = {name: [] for name in systems}
outputs, kv_bytes = {}, {}
for _ in range(3):
    for name, llm in systems.items():
        llm.engine.block_manager.reset_peak()
        out = llm.generate({"prompt_token_ids": ids}, params)[0]
        rates[name].append(out.metrics.decode_tokens_per_second)
        outputs[name] = out.token_ids
        kv_bytes[name] = llm.engine.kv_memory()["peak_allocated_bytes"]
print(f"| KV cache ({tokens} tokens of context) | tok/s | x float32 | x float16 | KV bytes allocated | x fewer than float32 | same 64 tokens as float32 |")
print("|---|---:|---:|---:|---:|---:|---|")
for name in systems:
    rate = statistics.median(rates[name])
    same = sum(a == b for a, b in zip(outputs[name], outputs["float32"]))
    print(
        f"| {name} | {rate:.1f} | {rate / statistics.median(rates['float32']):.2f}x | {rate / statistics.median(rates['float16']):.2f}x "
        f"| {kv_bytes[name] / 2**20:.1f} MiB | {kv_bytes['float32'] / kv_bytes[name]:.2f}x | {same}/{len(outputs[name])} |"
    )
