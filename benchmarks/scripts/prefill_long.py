"""Prefill of one long prompt (8,000 tokens of Spec-Bench text by default) on the default model, 2
threads: ours with int8 and float32 activations and prefill chunks of 512 and 2048 tokens, against
transformers' one causal SDPA forward over the whole prompt (float32), in one process.

    .venv/bin/python benchmarks/scripts/prefill_long.py [tokens]
"""

import sys
import time

import torch

from tokensieve import LLM, SamplingParams
from tokensieve.bench.cpu import context_ids, spec_bench_texts
from tokensieve.bench.hf_baseline import load_hf_model

torch.set_num_threads(2)
tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
engines = {a: LLM("smollm2-135m", prefix_caching=False, activations=a) for a in ("int8", "float32")}
ids = context_ids(lambda t: engines["int8"].tokenizer(t, add_special_tokens=False).input_ids, spec_bench_texts(), tokens)
print(f"| system | activations | prefill chunk | seconds for {tokens} tokens |\n|---|---|---:|---:|")
for activations, chunk in (("int8", 512), ("float32", 512), ("float32", 2048)):
    llm = engines[activations].with_options(prefill_chunk_size=chunk, max_batched_tokens=max(2048, chunk))
    llm.generate({"prompt_token_ids": ids[:256]}, SamplingParams(max_tokens=1))  # warm up
    seconds = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1))[0].metrics.time_to_first_token
    print(f"| tokensieve | {activations} | {chunk} | {seconds:.2f} |", flush=True)
hf = load_hf_model("smollm2-135m", torch.float32)
with torch.inference_mode():
    hf(input_ids=torch.tensor([ids[:256]]), logits_to_keep=1)
    began = time.perf_counter()
    hf(input_ids=torch.tensor([ids]), logits_to_keep=1)
print(f"| transformers | float32 | {tokens} | {time.perf_counter() - began:.2f} |")
