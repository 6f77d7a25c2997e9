"""Selection instead of eviction (Quest): every entry stays, but a decoding query attends only to the
blocks of its (layer, KV head) whose keys could score highest.

Each block keeps the per-dimension minimum and maximum of its keys. A query q bounds what any key of a
block can score by sum_d max(q_d * min_d, q_d * max_d); the query heads sharing a KV head take the
largest of their bounds. The blocks with the highest bounds are attended; the last block (the newest
entries, the only one not full) and the first (the attention sinks) always are, in that order of
priority. A head with no more blocks than its budget attends to all of them, so a budget covering every
block is exactly full attention. With a shortlist, the bounds only shortlist the candidates between the
first and the last block, and each candidate's best exact score picks among them (shortlist_scores). The
native kernels (kernels/block_selection.cpp) do the same in one call per layer; this is the rule in
PyTorch, for devices without them.
"""

from __future__ import annotations

import torch

from ..ranking import ranks


def block_bounds(q: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor) -> torch.Tensor:
    """Upper bounds [seqs, kv_heads, blocks] of q . k over each block's keys; q [seqs, kv_heads, group, dim],
    key_min and key_max [seqs, kv_heads, blocks, dim]."""
    q = q.float().unsqueeze(3)  # [seqs, kv_heads, group, 1, dim]
    low, high = key_min.float().unsqueeze(2), key_max.float().unsqueeze(2)
    return torch.maximum(q * low, q * high).sum(-1).amax(2)


def select_blocks(
    bounds: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor, budget_blocks: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block tables and lengths a decoding query attends through: the top `budget_blocks[s, h]` blocks by
    bound (first and last always), in their original order, and the places in `tables` they come from.
    bounds, tables [seqs, kv_heads, blocks]; lengths and budget_blocks [seqs, kv_heads]. Entries past a
    head's new length in its new table are never read."""
    width = tables.shape[-1]
    index = torch.arange(width, device=tables.device)
    num_blocks = (lengths + block_size - 1) // block_size
    scores = bounds.masked_fill(index >= num_blocks.unsqueeze(-1), float("-inf"))
    scores = scores.masked_fill(index == 0, torch.finfo(scores.dtype).max)
    scores = scores.masked_fill(index == num_blocks.unsqueeze(-1) - 1, float("inf"))
    budget = torch.minimum(budget_blocks, num_blocks).clamp(min=1)
    chosen = ranks(scores) < budget.unsqueeze(-1)
    first_chosen = torch.argsort((~chosen).to(torch.uint8), dim=-1, stable=True)[..., : int(budget.max())]
    selected = torch.gather(tables, -1, first_chosen)
    last_entries = lengths - (num_blocks - 1) * block_size
    new_lengths = torch.where(budget >= num_blocks, lengths, (budget - 1) * block_size + last_entries)
    return selected, new_lengths, first_chosen


def shortlisted(bounds: torch.Tensor, lengths: torch.Tensor, budget_blocks: torch.Tensor, block_size: int, factor: int) -> torch.Tensor:
    """[seqs, kv_heads, blocks]: the blocks between the first and the last whose bounds rank among the best
    `factor` times the number to choose there."""
    index = torch.arange(bounds.shape[-1], device=bounds.device)
    num_blocks = ((lengths + block_size - 1) // block_size).unsqueeze(-1)
    middle = (index > 0) & (index < num_blocks - 1)
    to_choose = (torch.minimum(budget_blocks, num_blocks.squeeze(-1)) - 2).clamp(min=0)
    return middle & (ranks(bounds.masked_fill(~middle, float("-inf"))) < (to_choose * factor).unsqueeze(-1))


def shortlist_scores(q: torch.Tensor, keys: torch.Tensor, listed: torch.Tensor) -> torch.Tensor:
    """Each listed block's score [seqs, kv_heads, blocks]: per query head, its keys' best q.k / sqrt(dim),
    softmax-normalised over the listed blocks, summed over the group (-inf where not listed).
    q [seqs, kv_heads, group, dim], keys [seqs, kv_heads, blocks, entries, dim], listed [seqs, kv_heads, blocks]."""
    best = torch.einsum("skgd,skbed->skgbe", q.float(), keys.float()).amax(-1) * q.shape[-1] ** -0.5
    best = best.masked_fill(~listed.unsqueeze(2), float("-inf"))
    weights = torch.softmax(best, dim=-1).nan_to_num(0.0).sum(2)
    return weights.masked_fill(~listed, float("-inf"))
