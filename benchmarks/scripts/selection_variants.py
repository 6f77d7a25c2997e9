"""Needles answered by block selection variants on the default model: niah_single cases at 4,096 tokens,
query-agnostic, greedy, 2 threads, beside the full cache. Each variant is ratio:dense_layers, with
optional +layer+layer... for TidalDecode's selection layers.

    .venv/bin/python benchmarks/scripts/selection_variants.py 20 0.125:2 0.125:4 0.125:8
    .venv/bin/python benchmarks/scripts/selection_variants.py 10 0.125:2 0.125:2+2+15
"""

import sys

import torch

from tokensieve import LLM, KVSelectionConfig
from tokensieve.bench.longctx_systems import OursSystem, score
from tokensieve.bench.longctx_tasks import CaseMaker
from tokensieve.config import KVPolicyConfig

torch.set_num_threads(2)
llm = LLM("smollm2-135m", prefix_caching=False, max_batched_tokens=2048, prefill_chunk_size=2048)
maker = CaseMaker(llm.tokenizer, 0)
cases = [maker.make("niah_single", 4096, i) for i in range(int(sys.argv[1]))]
systems = {"full": OursSystem(llm, KVPolicyConfig("full"), False)}
for spec in sys.argv[2:]:
    ratio, rest = spec.split(":")
    dense, *layers = rest.split("+")
    selection = KVSelectionConfig(ratio=float(ratio), dense_layers=int(dense),
                                  selection_layers=tuple(int(x) for x in layers) or None)
    systems[spec] = OursSystem(llm, KVPolicyConfig("full"), False, selection)
answered = dict.fromkeys(systems, 0.0)
for case in cases:
    for name, system in systems.items():
        answered[name] += score(case, system.answer(case))
print(" | ".join(f"{name}: {found:g}/{len(cases)}" for name, found in answered.items()))
