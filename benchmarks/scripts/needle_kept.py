"""How much of the needle each KV policy keeps: niah_single cases at 4k tokens on the default model,
the context compressed query-agnostically to `keep_ratio=0.25`, then the share of the needle's token
positions still stored, over every (layer, KV head), and per third layer. More sensitive than the
answer, which needs the needle whole in the heads that retrieve it.

    .venv/bin/python benchmarks/scripts/needle_kept.py streaming_llm,snapkv,keydiff,expected_attention,kvzip 3
"""

import sys

import torch

from tokensieve import LLM, SamplingParams
from tokensieve.bench.longctx_tasks import CaseMaker
from tokensieve.config import KVPolicyConfig


def needle_positions(tokenizer, case) -> list[int]:
    """Positions of the context tokens that spell the case's answer."""
    pieces = [tokenizer.decode([token]) for token in case.context_ids]
    at = "".join(pieces).find(case.answers[0])
    starts = [0]
    for piece in pieces:
        starts.append(starts[-1] + len(piece))
    return [i for i in range(len(pieces)) if starts[i] < at + len(case.answers[0]) and starts[i + 1] > at]


def kept_share(llm, case, needle) -> torch.Tensor:
    """[layers]: the share of needle positions stored per layer (mean over its KV heads) after compression."""
    engine = llm.engine
    request_id = engine.add_request(case.context_ids + case.question_ids, SamplingParams(max_tokens=1),
                                    compress_len=len(case.context_ids))
    seq = engine.sequence(request_id)
    while seq.num_processed < len(case.context_ids):
        engine.step()
    table = seq.block_table
    positions = engine.pool.positions[torch.from_numpy(table.padded_blocks(int(table.num_blocks.max())))].flatten(-2)
    stored = torch.arange(positions.shape[-1]) < torch.from_numpy(table.lengths).unsqueeze(-1)
    engine.abort(request_id)
    return torch.stack([((positions == p) & stored).any(-1) for p in needle], -1).float().mean((1, 2))


torch.set_num_threads(2)
base = LLM("smollm2-135m", prefix_caching=False)
maker = CaseMaker(base.tokenizer, 0)
for index in range(int(sys.argv[2])):
    case = maker.make("niah_single", 4096, index)
    needle = needle_positions(base.tokenizer, case)
    row = [f"case {index}: needle at {needle[0]} of {len(case.context_ids)}"]
    for name in sys.argv[1].split(","):
        per_layer = kept_share(base.with_options(kv_policy=KVPolicyConfig(name, keep_ratio=0.25)), case, needle)
        row.append(f"{name} {per_layer.mean():.2f} (layers: {' '.join(f'{x:.1f}' for x in per_layer.tolist()[::3])})")
    print(" | ".join(row), flush=True)
