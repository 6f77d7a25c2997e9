"""Builds one flat batch from the scheduled chunks and runs the model on it."""

from __future__ import annotations

import numpy as np
import torch

from ..models.llama import LlamaModel
from .attention import DecodeGroup, PagedAttention, PrefillChunk
from .kv_compression import KVCompressor
from .kv_pool import KVPool
from .scheduler import ScheduledChunk


class ModelRunner:
    def __init__(self, model: LlamaModel, pool: KVPool, kernels=None, compressor: KVCompressor | None = None):
        self.model = model
        self.pool = pool
        self.kernels = kernels
        self.compressor = compressor  # records attention for the KV policy when it asks
        self.device = pool.keys.device
        self.scratch: dict[str, torch.Tensor] = {}  # attention's gather buffers, kept between steps

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    def run(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, list[tuple[ScheduledChunk, slice]]]:
        """One forward over all chunks. Returns the logits and each chunk with its rows in them.

        A chunk gets logits for its last token when it completes its sequence, for every token
        when the sequence asked for prompt logits, and none otherwise. Decoding chunks (one
        token) go first so that they form one attention group.
        """
        chunks = sorted(chunks, key=lambda c: c.num_tokens != 1)
        token_ids, positions, write_slots, logits_rows, row_ranges = [], [], [], [], []
        prefills: list[PrefillChunk] = []
        decode_seqs = [c.seq for c in chunks if c.num_tokens == 1]
        observers = {}
        start = 0
        for chunk in chunks:
            seq, n = chunk.seq, chunk.num_tokens
            is_first = int(seq.block_table.lengths.max()) == 0
            token_ids.extend(seq.token_ids[seq.num_processed : seq.num_processed + n])
            chunk_positions = np.arange(seq.num_processed, seq.num_processed + n)
            positions.append(chunk_positions)
            write_slots.append(seq.block_table.append_slots(n))
            wanted = range(start, start + n) if seq.want_prompt_logits else (
                [start + n - 1] if chunk.completes_sequence else []
            )
            row_ranges.append(slice(len(logits_rows), len(logits_rows) + len(wanted)))
            logits_rows.extend(wanted)
            observer = self.compressor.observer(seq, n) if self.compressor else None
            if n == 1 and observer is not None:
                observers[start] = observer
            if n > 1:
                table = seq.block_table
                prefills.append(PrefillChunk(
                    start, start + n,
                    block_tables=self._tensor(table.padded_blocks(int(table.num_blocks.max()))),
                    lengths=self._tensor(table.lengths.copy()),
                    query_positions=self._tensor(chunk_positions),
                    is_first=is_first,
                    observer=observer,
                    observed_queries=self.compressor.policy.observed_queries if observer else None,
                ))
            start += n
        position_array = np.concatenate(positions)
        decode = self._decode_group(decode_seqs, position_array[: len(decode_seqs)], observers) if decode_seqs else None
        attention = PagedAttention(
            self.pool,
            write_slots=self._tensor(np.concatenate(write_slots, axis=1)),
            write_positions=self._tensor(position_array[:, None]),
            decode=decode,
            prefills=prefills,
            sliding_window=self.model.config.sliding_window,
            scratch=self.scratch,
            kernels=self.kernels,
        )
        logits = self.model(
            torch.tensor(token_ids, device=self.device),
            self._tensor(position_array),
            attention,
            torch.tensor(logits_rows, device=self.device, dtype=torch.long),
        )
        return logits, list(zip(chunks, row_ranges))

    def _decode_group(self, seqs, query_positions: np.ndarray, observers) -> DecodeGroup:
        width = max(int(s.block_table.num_blocks.max()) for s in seqs)
        tables = np.stack([s.block_table.padded_blocks(width) for s in seqs], axis=1)  # [layers, batch, heads, blocks]
        lengths = np.stack([s.block_table.lengths for s in seqs], axis=1)
        aligned = all(s.block_table.layers_aligned() for s in seqs)
        return DecodeGroup(self._tensor(tables), self._tensor(lengths), self._tensor(query_positions), aligned, observers)
