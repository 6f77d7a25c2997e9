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

        A chunk gets logits for its last token when it completes its sequence, for every token of a
        verification block, for the prompt positions its sequence asked for, and none otherwise.
        Decoding chunks (one token, or a verification block) go first: they form one attention group.
        """
        chunks = sorted(chunks, key=lambda c: not self._decodes(c))
        token_ids, positions, write_slots, logits_rows, row_ranges = [], [], [], [], []
        prefills: list[PrefillChunk] = []
        decoding = [c for c in chunks if self._decodes(c)]
        observers = {}
        start = 0
        for chunk in chunks:
            seq, n = chunk.seq, chunk.num_tokens
            is_first = int(seq.block_table.lengths.max()) == 0
            if chunk.draft is not None:
                token_ids.extend(chunk.draft.tokens)
                chunk_positions = seq.num_processed + chunk.draft.offsets
            else:
                token_ids.extend(seq.token_ids[seq.num_processed : seq.num_processed + n])
                chunk_positions = np.arange(seq.num_processed, seq.num_processed + n)
            positions.append(chunk_positions)
            write_slots.append(seq.block_table.append_slots(n))
            wanted = self._logits_rows(chunk, start)
            row_ranges.append(slice(len(logits_rows), len(logits_rows) + len(wanted)))
            logits_rows.extend(wanted)
            observer = self.compressor.observer(seq, 1 if chunk.draft is not None else n) if self.compressor else None
            if self._decodes(chunk) and observer is not None:
                observers[decoding.index(chunk)] = observer  # a block's root: the query plain decoding makes
            if not self._decodes(chunk):
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
        num_decode_rows = sum(c.num_tokens for c in decoding)
        decode = self._decode_group(decoding, position_array[:num_decode_rows], observers) if decoding else None
        attention = PagedAttention(
            self.pool,
            write_slots=self._tensor(np.concatenate(write_slots, axis=1)),
            write_positions=self._tensor(position_array[:, None]),
            decode=decode,
            prefills=prefills,
            sliding_window=self.model.config.sliding_window,
            scratch=self.scratch,
            kernels=self.kernels,
            dtype=self.model.norm.weight.dtype,
        )
        logits = self.model(
            torch.tensor(token_ids, device=self.device),
            self._tensor(position_array),
            attention,
            torch.tensor(logits_rows, device=self.device, dtype=torch.long),
        )
        return logits, list(zip(chunks, row_ranges))

    @staticmethod
    def _decodes(chunk: ScheduledChunk) -> bool:
        return chunk.draft is not None or chunk.num_tokens == 1

    @staticmethod
    def _logits_rows(chunk: ScheduledChunk, start: int) -> range:
        seq, n = chunk.seq, chunk.num_tokens
        if chunk.draft is not None or seq.want_prompt_logits:
            return range(start, start + n)
        first = n - 1 if chunk.completes_sequence else n
        if seq.first_logits_position is not None:
            first = min(first, max(0, seq.first_logits_position - seq.num_processed))
        return range(start + first, start + n)

    def _decode_group(self, chunks: list[ScheduledChunk], query_positions: np.ndarray, observers) -> DecodeGroup:
        seqs = [c.seq for c in chunks]
        width = max(int(s.block_table.num_blocks.max()) for s in seqs)
        tables = np.stack([s.block_table.padded_blocks(width) for s in seqs], axis=1)  # [layers, seqs, heads, blocks]
        lengths = np.stack([s.block_table.lengths for s in seqs], axis=1)
        aligned = all(s.block_table.layers_aligned() for s in seqs)
        rows = np.array([c.num_tokens for c in chunks])
        first_row = np.cumsum(rows) - rows
        slots = int(rows.max())
        slot = np.arange(slots)
        row_of_slot = first_row[:, None] + np.where(slot < rows[:, None], slot, 0)  # padding repeats the first row
        slot_of_row = visibility = None
        if slots > 1:
            seq_of_row = np.repeat(np.arange(len(chunks)), rows)
            slot_of_row = self._tensor(seq_of_row * slots + np.arange(rows.sum()) - first_row[seq_of_row])
            visibility = self._tensor(self._block_visibility(chunks, slots))
        return DecodeGroup(
            self._tensor(tables), self._tensor(lengths), self._tensor(query_positions[row_of_slot]),
            self._tensor(row_of_slot), slot_of_row, aligned, observers,
            visibility, self._tensor(rows) if visibility is not None else None,
        )

    @staticmethod
    def _block_visibility(chunks: list[ScheduledChunk], slots: int) -> np.ndarray:
        """[seqs, slots, slots]: which of its block's own entries each slot sees (padding sees all)."""
        visibility = np.ones((len(chunks), slots, slots), dtype=bool)
        for index, chunk in enumerate(chunks):
            if chunk.draft is not None:
                rows = len(chunk.draft)
                visibility[index, :rows, :rows] = chunk.draft.mask
        return visibility
