"""What block selection could find if it read every key: niah_single cases at 4,096 tokens on the default
model, query-agnostic, greedy, 2 threads, each decoding query attending to 1/8 of the blocks of each
(layer, KV head), chosen by

- quest: Quest's key bounds (the engine's rule);
- max: each block's best exact q.k, the largest over the query heads of the KV head;
- maxsoft: each block's best exact q.k, softmax-normalised over the blocks per query head and summed
  over the group (what the engine's shortlist does among the shortlisted blocks);
- mass: the attention each block receives, summed over the group's query heads.

The oracles read every key, so they save no time: they show where Quest's bounds lose the needle.

    .venv/bin/python benchmarks/scripts/selection_oracle.py 0-12 quest,max,maxsoft,mass
    .venv/bin/python benchmarks/scripts/selection_oracle.py 6,17,18,21,23,24,27,28 quest,max,maxsoft,mass
"""

import sys

import torch

from tokensieve import LLM, KVSelectionConfig
from tokensieve.bench.longctx_systems import OursSystem, score
from tokensieve.bench.longctx_tasks import CaseMaker
from tokensieve.config import KVPolicyConfig
from tokensieve.engine.attention import PagedAttention
from tokensieve.engine.block_selection import select_blocks

quest_choice = PagedAttention._choose
rule = {"name": "quest"}


def oracle_choice(self, layer, q, tables, lengths):
    """The blocks an oracle reading every key of the (layer, KV head) chooses."""
    if rule["name"] == "quest":
        return quest_choice(self, layer, q, tables, lengths)
    pool, size = self.pool, self.pool.block_size
    queries = self._per_sequence(q, tables).float()  # [seqs, kv_heads, group, dim]
    keys = pool.read_blocks("keys", tables.flatten()).view(*tables.shape, size, -1).float()  # [s, h, blocks, entries, dim]
    stored = torch.arange(tables.shape[-1] * size).view(-1, size) < lengths[..., None, None]
    logits = torch.einsum("shgd,shbed->shgbe", queries, keys) * queries.shape[-1] ** -0.5
    logits = logits.masked_fill(~stored.unsqueeze(2), float("-inf"))
    if rule["name"] == "max":
        scores = logits.amax(-1).amax(2)
    elif rule["name"] == "maxsoft":
        scores = torch.softmax(logits.amax(-1), dim=-1).sum(2)
    else:  # mass
        scores = torch.softmax(logits.flatten(-2), dim=-1).view_as(logits).sum(-1).sum(2)
    return select_blocks(scores, tables, lengths, self._budget_blocks[layer], size)


def case_indices(spec: str) -> list[int]:
    if "-" in spec:
        first, last = map(int, spec.split("-"))
        return list(range(first, last + 1))
    return [int(i) for i in spec.split(",")]


torch.set_num_threads(2)
PagedAttention._choose = oracle_choice
llm = LLM("smollm2-135m", prefix_caching=False, max_batched_tokens=2048, prefill_chunk_size=2048)
maker = CaseMaker(llm.tokenizer, 0)
cases = [maker.make("niah_single", 4096, i) for i in case_indices(sys.argv[1])]
rules = sys.argv[2].split(",")
full = OursSystem(llm, KVPolicyConfig("full"), False)
selecting = OursSystem(llm, KVPolicyConfig("full"), False, KVSelectionConfig(ratio=0.125))
found = dict.fromkeys(["full", *rules], 0.0)
for case in cases:
    found["full"] += score(case, full.answer(case))
    for name in rules:
        rule["name"] = name
        found[name] += score(case, selecting.answer(case))
print(" | ".join(f"{name}: {total:g}/{len(cases)}" for name, total in found.items()))
