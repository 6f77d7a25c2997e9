"""Decode steps read from static device buffers: no host sync, one transfer in, and on CUDA a graph
replayed per bucket.

A step whose chunks are all decoding (one token each, or a verification block of drafted tokens; no
KV policy, no block selection) packs its inputs on the host: token ids and positions of every row,
lengths per (layer, KV head), each block's visibility mask as bits, and the block-table columns that
changed since the device last saw them (device_tables.py). It copies them to the device in one
transfer and spreads them over the fixed buffers of the smallest bucket that holds the step: a batch
size (1, 2, 4, 8, ...) by rows per sequence (1 for plain decoding; 2, 4, ... 128 for verification,
each sequence's block padded to the largest). The forward reads only those buffers, so on CUDA it is
captured once per bucket as a CUDA graph and replayed (one launch instead of hundreds); elsewhere the
same code runs eagerly. Padding writes to and reads from a scratch block that the block manager never
hands out. Attention goes through paged_decode.py: a Triton kernel on CUDA, its PyTorch twin elsewhere.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.llama import LlamaModel
from .device_tables import DeviceBlockTables
from .kv_pool import KVPool
from .scheduler import ScheduledChunk
from .static_inputs import StaticAttention, StepInputs, visibility_words

MAX_BLOCK_ROWS = 128  # a verification block with more rows runs eagerly


def powers_of_two(limit: int) -> list[int]:
    """1, 2, 4, ... up to the first that holds `limit`: the bucket sizes."""
    sizes = [1]
    while sizes[-1] < limit:
        sizes.append(sizes[-1] * 2)
    return sizes


def bucket(size: int) -> int:
    return 1 << max(0, size - 1).bit_length()


class StaticDecoder:
    def __init__(self, model: LlamaModel, pool: KVPool, max_num_seqs: int, max_model_len: int, max_rows: int,
                 scratch_block: int):
        """`max_rows`: the most rows a step may pad to (the engine's max_batched_tokens); `scratch_block`: a
        pool block no sequence owns."""
        self.model, self.pool, self.device = model, pool, pool.device
        cfg = model.config
        self.num_layers, self.num_kv_heads, self.window = cfg.num_layers, cfg.num_kv_heads, cfg.sliding_window
        self.batch_buckets = powers_of_two(max_num_seqs)
        self.max_rows = max_rows
        # a sequence holds at most max_model_len entries, and a verification block of up to MAX_BLOCK_ROWS past them
        columns = -(-(max_model_len + MAX_BLOCK_ROWS) // pool.block_size)
        self.tables = DeviceBlockTables(cfg.num_layers, cfg.num_kv_heads, self.batch_buckets[-1], columns, scratch_block,
                                        self.device)
        self.scratch_slot = scratch_block * pool.block_size
        self.uses_graphs = self.device.type == "cuda"
        self.inputs: dict[tuple[int, int], StepInputs] = {}  # by (batch, rows) bucket
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = None  # one memory pool for every bucket's graph (one replays at a time)
        self._host = torch.empty(0, dtype=torch.int64)
        self._device_packed = torch.empty(0, dtype=torch.int64, device=self.device)
        self._sent = None  # on CUDA, an event: the last transfer has left the host buffer

    def takes(self, chunks: list[ScheduledChunk]) -> bool:
        """Whether the step is decoding that fits a bucket (verification only without a sliding window)."""
        if not all(c.draft is not None or c.num_tokens == 1 for c in chunks) or any(c.seq.want_prompt_logits for c in chunks):
            return False
        rows = bucket(max(c.num_tokens for c in chunks))
        if rows > 1 and (self.window is not None or rows > MAX_BLOCK_ROWS):
            return False
        return len(chunks) <= self.batch_buckets[-1] and bucket(len(chunks)) * rows <= max(self.max_rows, bucket(len(chunks)))

    def forward(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, int]:
        """Logits of every row of the bucket, and its rows per sequence: chunk i's rows are i * rows onwards.
        Each chunk's entries are appended to its sequence's block table here."""
        key = bucket(len(chunks)), bucket(max(c.num_tokens for c in chunks))
        if key not in self.inputs:
            self.inputs[key] = StepInputs(*key, self.num_layers, self.num_kv_heads, self.device)
        inputs = self.inputs[key]
        packed, num_changes, width = self._pack(chunks, inputs)
        if self.device.type != "cpu":
            packed = self._send(packed)
        inputs.fill(packed)
        if num_changes:
            changes = packed[inputs.packed_size :]
            self.tables.apply(changes[:num_changes], changes[num_changes:])
        if not self.uses_graphs:
            return self._forward(inputs, width), inputs.rows
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits, inputs.rows

    def _forward(self, inputs: StepInputs, width: int) -> torch.Tensor:
        attention = StaticAttention(self.pool, self.tables.tables, inputs, width, self.window, self.scratch_slot)
        return self.model(inputs.buffers["token_ids"].view(-1), inputs.buffers["positions"].view(-1), attention)

    def _capture(self, inputs: StepInputs) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (kernel compilation, cuBLAS workspaces), then record the forward.
        The warm-up computes this very step, so the entries it writes are the ones the replay writes."""
        columns = self.tables.columns
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(inputs, columns)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = self._forward(inputs, columns)
        self._graph_pool = graph.pool()
        return graph, logits

    def _send(self, packed: torch.Tensor) -> torch.Tensor:
        """The step's one host-to-device transfer (on CUDA asynchronous, from pinned memory)."""
        if len(self._device_packed) < len(packed):
            self._device_packed = torch.empty(2 * len(packed), dtype=torch.int64, device=self.device)
        on_device = self._device_packed[: len(packed)].copy_(packed, non_blocking=True)
        if self.device.type == "cuda":
            self._sent = torch.cuda.Event()
            self._sent.record()
        return on_device

    def _host_buffer(self, size: int, keep: int = 0) -> np.ndarray:
        """The pinned host buffer (on CUDA), at least `size` long, once the last transfer has left it; a
        buffer grown keeps its first `keep` values."""
        if self._sent is not None:
            self._sent.synchronize()  # long done by now: the last step read its tokens back
            self._sent = None
        if len(self._host) < size:
            grown = torch.empty(2 * size, dtype=torch.int64, pin_memory=self.device.type == "cuda")
            grown[:keep] = self._host[:keep]
            self._host, self._host_array = grown, grown.numpy()
        return self._host_array

    def _pack(self, chunks: list[ScheduledChunk], inputs: StepInputs) -> tuple[torch.Tensor, int, int]:
        """The step's inputs, padded to the bucket, as one int64 tensor: StepInputs' fields, then the changed
        table entries (flat indices into the device tables, then their block ids). Returns it, the number
        of changed entries and the table columns any sequence uses."""
        size = inputs.packed_size
        fields = inputs.split(self._host_buffer(size))
        for name in ("token_ids", "positions"):
            fields[name][:] = 0
        fields["block_rows"][:], fields["lengths"][:] = 1, 1
        visibility = np.ones((inputs.batch, inputs.rows, inputs.rows), dtype=bool)  # padding rows see everything
        places = fields["places"]
        places[len(chunks) :] = self.tables.padding_place
        places[: len(chunks)] = self.tables.places([c.seq for c in chunks])
        indices, block_ids, width = [], [], 1
        for index, chunk in enumerate(chunks):
            seq, n, draft = chunk.seq, chunk.num_tokens, chunk.draft
            fields["token_ids"][index, :n] = draft.tokens if draft is not None else seq.token_ids[seq.num_processed]
            fields["positions"][index, :n] = seq.num_processed + (draft.offsets if draft is not None else 0)
            fields["block_rows"][index] = n
            if draft is not None:
                visibility[index, :n, :n] = draft.mask
            seq.block_table.claim(n)
            fields["lengths"][:, index] = seq.block_table.lengths
            if not self.uses_graphs:  # a graph reads every column
                width = max(width, int(seq.block_table.num_blocks.max()))
            changed = self.tables.changes(seq, places[index])
            if changed is not None:
                indices.append(changed[0]), block_ids.append(changed[1])
        if "visibility" in fields:
            fields["visibility"][:] = visibility_words(visibility)
        num_changes = sum(map(len, indices))
        if num_changes:
            host = self._host_buffer(size + 2 * num_changes, keep=size)
            host[size : size + num_changes] = np.concatenate(indices)
            host[size + num_changes : size + 2 * num_changes] = np.concatenate(block_ids)
        return self._host[: size + 2 * num_changes], num_changes, width
