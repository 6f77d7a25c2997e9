"""Builds one flat batch from the scheduled chunks and runs the model on it."""

from __future__ import annotations

import numpy as np
import torch

from ..config import KVSelectionConfig
from ..models.llama import LlamaModel
from .attention import DecodeGroup, PagedAttention, PrefillChunk
from .block_manager import BlockManager
from .kv_compression import KVCompressor
from .kv_pool import KVPool
from .scheduler import ScheduledChunk
from .selection_cache import SelectionCache
from .static_decode import StaticDecoder


class ModelRunner:
    def __init__(
        self, model: LlamaModel, pool: KVPool, block_manager: BlockManager, kernels=None,
        compressor: KVCompressor | None = None, selection: KVSelectionConfig | None = None,
        static_decoder: StaticDecoder | None = None,
    ):
        self.model = model
        self.pool = pool
        self.block_manager = block_manager
        self.selection = selection  # decoding attends to selected blocks only
        # over every decode forward with selection: entries attended and entries held, in the selected layers
        self.attended_entries = self.stored_entries = 0
        self.reused_choices = 0  # (layer, decode forward) pairs that reused an earlier block choice (TokenSelect)
        self.kernels = kernels
        self.compressor = compressor  # records attention for the KV policy when it asks
        self.device = pool.device
        self.scratch: dict[str, torch.Tensor] = {}  # attention's gather buffers, kept between steps
        self.static_decoder = static_decoder  # when set, runs the steps that only decode (tokens or draft trees)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    def run(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, list[tuple[ScheduledChunk, slice]]]:
        """One forward over all chunks. Returns the logits and each chunk with its rows in them.

        A chunk gets logits for its last token when it completes its sequence, for every token of a
        verification block, for the prompt positions its sequence asked for, and none otherwise.
        Decoding chunks (one token, or a verification block) go first: they form one attention group.
        """
        if self.static_decoder is not None and self.static_decoder.takes(chunks):
            logits, rows = self.static_decoder.forward(chunks)  # chunk i's rows start at i * rows
            wanted = [self._logits_rows(c, index * rows) for index, c in enumerate(chunks)]  # as the eager path picks
            return logits, [(c, slice(chunk_rows.start, chunk_rows.stop)) for c, chunk_rows in zip(chunks, wanted)]
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
                query_positions = self._tensor(chunk_positions)
                query_observer = self.compressor.query_observer(seq, query_positions) if self.compressor else None
                observed = self.compressor.policy.observed_queries if observer else None
                prefills.append(self._prefill_chunk(seq, start, query_positions, is_first, observer, observed, query_observer))
            start += n
        position_array = np.concatenate(positions)
        num_decode_rows = sum(c.num_tokens for c in decoding)
        decode = self._decode_group(decoding, position_array[:num_decode_rows], observers) if decoding else None
        logits = self._forward(token_ids, position_array, np.concatenate(write_slots, axis=1), decode, prefills, logits_rows)
        return logits, list(zip(chunks, row_ranges))

    def run_discarded(self, seq, token_ids: list[int], observer, observed_queries: int | None = None) -> None:
        """A forward of `token_ids` after everything `seq` has processed, attending to its stored entries and
        observed by `observer` (its last `observed_queries` queries; None: all); their own entries are dropped
        afterwards (KVzip's repeat of the context, the retrieval-head probe)."""
        n = len(token_ids)
        table = seq.block_table
        self.block_manager.reserve(table, n)
        write_slots = table.append_slots(n)
        positions = np.arange(seq.num_processed, seq.num_processed + n)
        chunk = self._prefill_chunk(seq, 0, self._tensor(positions), False, observer, observed_queries, None)
        try:
            self._forward(token_ids, positions, write_slots, None, [chunk], [])
        finally:
            self.block_manager.keep_appended(table, n, np.empty(0, dtype=np.int64))

    def _prefill_chunk(
        self, seq, start: int, query_positions: torch.Tensor, is_first: bool, observer, observed_queries, query_observer
    ):
        """The PrefillChunk of `seq`'s tokens at rows start.. of the batch, its entries already appended."""
        table = seq.block_table
        return PrefillChunk(
            start, start + len(query_positions),
            block_tables=self._tensor(table.padded_blocks(int(table.num_blocks.max()))),
            lengths=self._tensor(table.lengths.copy()),
            query_positions=query_positions,
            is_first=is_first,
            observer=observer,
            observed_queries=observed_queries,
            query_observer=query_observer,
        )

    def _forward(self, token_ids, positions: np.ndarray, write_slots: np.ndarray, decode, prefills, logits_rows):
        attention = PagedAttention(
            self.pool,
            write_slots=self._tensor(write_slots),
            write_positions=self._tensor(positions[:, None]),
            decode=decode,
            prefills=prefills,
            sliding_window=self.model.config.sliding_window,
            scratch=self.scratch,
            kernels=self.kernels,
            dtype=self.model.norm.weight.dtype,
            selection=self.selection,
        )
        logits = self.model(
            torch.tensor(token_ids, device=self.device),
            self._tensor(positions),
            attention,
            torch.tensor(logits_rows, device=self.device, dtype=torch.long),
        )
        if attention.selected_lengths:
            self.attended_entries += int(torch.stack(attention.selected_lengths).sum())
            self.stored_entries += int(decode.lengths[self.selection.dense_layers :].sum())
            self.reused_choices += attention.reused_choices
        return logits

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
        group = DecodeGroup(
            self._tensor(tables), self._tensor(lengths), self._tensor(query_positions[row_of_slot]),
            self._tensor(row_of_slot), slot_of_row, aligned, observers,
            visibility, self._tensor(rows) if visibility is not None else None,
        )
        if self.selection is not None and self.selection.reuse_above is not None:
            for seq in seqs:
                seq.selection_cache = seq.selection_cache or SelectionCache()
            group.selection_caches = [(s.selection_cache, s.block_table.version) for s in seqs]
        return group

    @staticmethod
    def _block_visibility(chunks: list[ScheduledChunk], slots: int) -> np.ndarray:
        """[seqs, slots, slots]: which of its block's own entries each slot sees (padding sees all)."""
        visibility = np.ones((len(chunks), slots, slots), dtype=bool)
        for index, chunk in enumerate(chunks):
            if chunk.draft is not None:
                rows = len(chunk.draft)
                visibility[index, :rows, :rows] = chunk.draft.mask
        return visibility
