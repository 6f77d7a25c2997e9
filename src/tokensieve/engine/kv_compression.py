"""Runs the configured KV policy for the engine: records the attention (or the queries) a policy asks
for during forwards, and compresses a sequence's cache to its budget after prefill chunks (and every
`decode_interval` decode steps), returning the evicted entries' blocks to the pool. A policy that
reconstructs (KVzip) compresses once, when the context is in, after the engine has run its repeat."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import KVPolicyConfig
from ..models.rope import RotaryEmbedding
from ..policies import EntryView, keep_mask, layer_budgets, make_policy, ratio_budget, retrieval_budgets
from .block_manager import BlockManager
from .kv_merge import merge_evicted
from .kv_pool import KVPool
from .query_moments import QuerySums, unrotate
from .sequence import Sequence


def _fit(record: torch.Tensor, width: int) -> torch.Tensor:
    """A record [heads, entries] cut or zero-padded to `width` entries."""
    return F.pad(record, (0, width - record.shape[-1])) if record.shape[-1] < width else record[..., :width]


class KVCompressor:
    """Made by the engine only for a policy that evicts."""

    def __init__(
        self, config: KVPolicyConfig, pool: KVPool, block_manager: BlockManager, rotary: RotaryEmbedding | None = None
    ):
        self.config = config
        self.policy = make_policy(config.name, config.options, config.seed)
        self.pool = pool
        self.block_manager = block_manager
        self.rotary = rotary  # to see queries as they were before RoPE (policies that model them)
        # a reconstructing policy's repeat of a sequence's context, given the observer of its attention
        self.reconstruct: Callable[[Sequence, Callable], None] | None = None
        self.retrieval: torch.Tensor | None = None  # bool [layers, kv_heads]: heads that keep everything (head_probe.py)
        self.num_compressions = 0

    # ---- observation (called from inside the forward) ----------------------------------------
    def observer(self, seq: Sequence, num_tokens: int):
        """The callback that records this forward's attention for `seq`, or None if none is needed."""
        if self.policy.observed_queries == 0 or self.policy.reconstructs:
            return None
        in_compressed_prompt = seq.num_processed + num_tokens <= seq.compress_len
        if not in_compressed_prompt and self.config.decode_interval is None:
            return None
        return partial(self.record, seq)

    def query_observer(self, seq: Sequence, positions: torch.Tensor):
        """The callback that adds a prefill chunk's queries at `positions` to `seq`'s query moments, or None."""
        if not self.policy.models_queries or seq.num_processed >= seq.compress_len:
            return None
        return partial(self.record_queries, seq, positions)

    def record_queries(self, seq: Sequence, positions: torch.Tensor, layer: int, queries: torch.Tensor) -> None:
        """Add queries [tokens, heads, dim] (after RoPE) to the moments, leaving out the sinks' (as kvpress does)."""
        if seq.query_sums is None:
            seq.query_sums = QuerySums(self.block_manager.num_layers, queries.shape[1], queries.shape[2], queries.device)
        counted = positions >= self.policy.sinks
        seq.query_sums.add(layer, unrotate(queries[counted], positions[counted], self.rotary))

    def record(self, seq: Sequence, layer: int, logits: torch.Tensor, first_query: int, num_queries: int) -> None:
        """Record the attention of observed queries first_query.. (of `num_queries` this forward) over
        the stored entries; logits [kv_heads, group, queries, entries], -inf where not visible."""
        policy = self.policy
        weights = policy.attention_weights(logits.float())
        if policy.accumulate and policy.decay != 1.0:
            queries_after = num_queries - first_query - 1 - torch.arange(logits.shape[2], device=logits.device)
            weights = weights * (policy.decay ** queries_after.float()).view(1, 1, -1, 1)
        # GQA: the query heads sharing a KV head vote together, or the one that attends most speaks for them
        contribution = weights.amax(dim=(1, 2)) if policy.keeps_maximum else weights.sum(dim=(1, 2))
        if seq.kv_attention is None:
            seq.kv_attention = [None] * self.block_manager.num_layers
        previous = seq.kv_attention[layer]
        if first_query == 0 and previous is not None:  # a new forward: decay the record, or forget it
            previous = previous * policy.decay**num_queries if policy.accumulate else None
        if previous is not None:
            width = max(previous.shape[-1], contribution.shape[-1])
            combine = torch.maximum if policy.keeps_maximum else torch.add
            contribution = combine(_fit(previous, width), _fit(contribution, width))
        seq.kv_attention[layer] = contribution

    # ---- compression (called after the forward) --------------------------------------------
    def after_forward(self, seq: Sequence) -> None:
        """Compress `seq` when its policy is due: after a chunk of the compressed part of the prompt,
        or after every `decode_interval` forwards beyond it. A reconstructing policy repeats the context
        first, once it is all in, and compresses then only."""
        if self.policy.reconstructs:
            if seq.num_processed == seq.compress_len:
                self.reconstruct(seq, partial(self.record, seq))
                self.compress(seq)
        elif seq.num_processed <= seq.compress_len:
            self.compress(seq)
        elif self.config.decode_interval is not None:
            seq.forwards_since_compression += 1
            if seq.forwards_since_compression >= self.config.decode_interval:
                self.compress(seq)

    def budgets(self, seq: Sequence) -> torch.Tensor:
        mean = self.config.budget or ratio_budget(self.config.keep_ratio, seq.num_processed)
        manager = self.block_manager
        budgets = layer_budgets(mean, manager.num_layers, manager.num_kv_heads, self.config.allocation)
        if self.retrieval is not None:
            budgets = retrieval_budgets(budgets, torch.from_numpy(seq.block_table.lengths.copy()), self.retrieval)
        return budgets

    def compress(self, seq: Sequence) -> None:
        """Keep the best entries of every (layer, KV head) under the budget; free the rest's blocks."""
        seq.forwards_since_compression = 0
        table = seq.block_table
        device = self.pool.device
        lengths = torch.from_numpy(table.lengths.copy())
        budgets = self.budgets(seq)
        if self.config.allocation == "global":  # over budget: every head together, a layer's heads, or a head
            over = lengths.sum() > budgets.sum()
        elif self.config.allocation == "adaptive":
            over = lengths.sum(-1) > budgets.sum(-1)
        else:
            over = lengths > budgets
        if not bool(over.any()):
            return
        blocks = torch.from_numpy(table.padded_blocks(int(table.num_blocks.max()))).to(device)
        positions = self.pool.positions[blocks].flatten(-2)  # [layers, heads, entries]
        width = positions.shape[-1]
        attention = None
        if self.policy.observed_queries != 0:  # every layer is observed in the same forwards: all or none recorded
            attention = positions.new_zeros(positions.shape, dtype=torch.float32) if seq.kv_attention is None else (
                torch.stack([_fit(record, width) for record in seq.kv_attention])
            )
        view = EntryView(attention, positions, lengths.to(device), budgets.to(device))
        if self.policy.reads_entries:
            view.stored = partial(self._stored, blocks)
        if self.policy.models_queries:
            view.queries = seq.query_sums.moments(self.rotary, seq.num_processed, self.policy.future_positions)
        keep = keep_mask(self.policy.scores(view), view.lengths, view.budgets, self.config.allocation)
        if self.config.merge_above is not None:
            self._merge_evicted(blocks, keep, view.lengths, table)
        if self.retrieval is not None:
            self._compensate(blocks, keep, view.lengths, table)
        source, destination = self.block_manager.compact(table, keep.cpu().numpy())
        self.pool.move(torch.from_numpy(source).to(device), torch.from_numpy(destination).to(device), table)
        if attention is not None:
            seq.kv_attention = list(self._compact_record(attention, keep).unbind(0))
        self.num_compressions += 1

    def _stored(self, blocks: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values [kv_heads, entries, dim] in `blocks` [layers, kv_heads, blocks] of `layer`, as float32."""
        read = (self.pool.read_blocks(name, blocks[layer].flatten()) for name in ("keys", "values"))
        keys, values = (entries.reshape(blocks.shape[1], -1, self.pool.head_dim).float() for entries in read)
        return keys, values

    def _slots(self, blocks: torch.Tensor, layer: int, head: int, entries: torch.Tensor) -> torch.Tensor:
        """Flat pool slots of a (layer, head)'s entries."""
        size = self.pool.block_size
        return blocks[layer, head, entries // size] * size + entries % size

    def _rewrite(self, blocks: torch.Tensor, heads_of_layer: dict[int, list[int]], rewrite, table) -> None:
        """Per layer, `rewrite(layer, head, keys, values)` gives a head's (entries, new keys, new values) from
        its stored keys and values [entries, dim] as float32; the new entries are written back in one go."""
        for layer, heads in heads_of_layer.items():
            keys, values = self._stored(blocks, layer)
            slots, new_keys, new_values = [], [], []
            for head in heads:
                entries, head_keys, head_values = rewrite(layer, head, keys[head], values[head])
                slots.append(self._slots(blocks, layer, head, entries))
                new_keys.append(head_keys)
                new_values.append(head_values)
            self.pool.overwrite(torch.cat(slots), torch.cat(new_keys), torch.cat(new_values), table)

    def _merge_evicted(self, blocks: torch.Tensor, keep: torch.Tensor, lengths: torch.Tensor, table) -> None:
        """Fold each (layer, KV head)'s evicted entries into their most similar kept ones (kv_merge.py)."""

        def merge(layer, head, keys, values):
            stored = keep[layer, head, : int(lengths[layer, head])]
            kept, evicted = stored.nonzero().flatten(), (~stored).nonzero().flatten()
            return merge_evicted(keys, values, kept, evicted, self.config.merge_above)

        every_head = list(range(blocks.shape[1]))
        self._rewrite(blocks, dict.fromkeys(range(blocks.shape[0]), every_head), merge, table)

    def _compensate(self, blocks: torch.Tensor, keep: torch.Tensor, lengths: torch.Tensor, table) -> None:
        """RazorAttention's compensation: in each non-retrieval head that evicts, the first evicted entry stays,
        holding the mean key and value of everything evicted (keep gains it)."""
        stored = torch.arange(keep.shape[-1], device=keep.device) < lengths.unsqueeze(-1)
        evicting = ((stored & ~keep).any(-1) & ~self.retrieval.to(keep.device)).nonzero().tolist()
        heads_of_layer = {}
        for layer, head in evicting:
            heads_of_layer.setdefault(layer, []).append(head)

        def compensate(layer, head, keys, values):
            evicted = (stored[layer, head] & ~keep[layer, head]).nonzero().flatten()
            keep[layer, head, evicted[0]] = True
            return evicted[:1], keys[evicted].mean(0, keepdim=True), values[evicted].mean(0, keepdim=True)

        self._rewrite(blocks, heads_of_layer, compensate, table)

    @staticmethod
    def _compact_record(attention: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The record of the kept entries, moved to the front in order (as the pool entries were)."""
        counts = keep.sum(-1, keepdim=True)
        order = torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True)[..., : int(counts.max())]
        kept = torch.gather(attention, -1, order)
        return kept.masked_fill(torch.arange(kept.shape[-1], device=kept.device) >= counts, 0.0)
