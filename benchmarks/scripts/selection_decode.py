"""Decode speed with block selection (Quest) against full attention, on one long prompt (8,000 tokens
of Spec-Bench text by default) on the default model, 2 threads, default settings; 64 greedy tokens,
median of 3 runs each, interleaved. Prints tokens/s, the share of the held entries decoding attended to
and, with TokenSelect's reuse, the share of (layer, step) choices reused. A shortlist of f also reads the
keys of f times the chosen blocks to score them exactly.

    .venv/bin/python benchmarks/scripts/selection_decode.py [tokens]
"""

import statistics
import sys

import torch

from tokensieve import LLM, KVSelectionConfig, SamplingParams
from tokensieve.bench.cpu import context_ids, spec_bench_texts

torch.set_num_threads(2)
tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
full = LLM("smollm2-135m", prefix_caching=False)
ids = context_ids(lambda t: full.tokenizer(t, add_special_tokens=False).input_ids, spec_bench_texts(), tokens)
systems = {"full attention": full}
for ratio in (0.25, 0.125, 0.0625):
    systems[f"quest {ratio:g}"] = full.with_options(kv_selection=KVSelectionConfig(ratio=ratio))
for shortlist in (2, 4):  # the bounds shortlist this many times the blocks; their keys' exact scores choose
    systems[f"quest 0.125, shortlist {shortlist}"] = full.with_options(
        kv_selection=KVSelectionConfig(ratio=0.125, shortlist=shortlist)
    )
for reuse in (0.9, -1.0):  # TokenSelect: reuse a layer's choice while queries stay this similar (-1: always)
    systems[f"quest 0.125, reuse at cosine >= {reuse:g}"] = full.with_options(
        kv_selection=KVSelectionConfig(ratio=0.125, reuse_above=reuse)
    )
params = SamplingParams(max_tokens=65, temperature=0, ignore_eos=True)
rates = {name: [] for name in systems}
outputs = {}
for _ in range(3):
    for name, llm in systems.items():
        out = llm.generate({"prompt_token_ids": ids}, params)[0]
        rates[name].append(out.metrics.decode_tokens_per_second)
        outputs[name] = out.token_ids
print(f"| decoding ({tokens} tokens of context) | tok/s | x full | entries read (selected layers) | choices reused | same 64 tokens as full |")
print("|---|---:|---:|---:|---:|---|")
base = statistics.median(rates["full attention"])
for name, llm in systems.items():
    stats = llm.engine.stats()
    read = stats["selected_decode_entries"] / stats["stored_decode_entries"] if stats["stored_decode_entries"] else 1.0
    rate = statistics.median(rates[name])
    same = sum(a == b for a, b in zip(outputs[name], outputs["full attention"]))
    decode_steps = stats["generation_tokens"] - 3  # each of the 3 requests' first token comes from its prefill
    selecting = (llm.engine.model.config.num_layers - 2) * decode_steps  # (layer, step) pairs that choose blocks
    reused = stats["reused_block_choices"] / selecting if stats["stored_decode_entries"] else 0.0
    print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {read:.3f} | {reused:.2f} | {same}/{len(outputs[name])} |")
