"""Decode steps read from static device buffers: no host sync, one transfer in, and on CUDA a graph
replayed per batch-size bucket.

A step whose chunks are all one plain decoding token each (no draft to verify, no KV policy, no block
selection) packs its inputs on the host (token ids, positions, lengths per (layer, KV head), and the
block-table columns that changed since the device last saw them) into one buffer, copies it to the
device in one transfer, and spreads it over the fixed buffers of the smallest bucket (1, 2, 4, 8, ...)
that holds the batch. Block tables live on the device, one place per running sequence, so a step
sends only the blocks added since the last one (one column per (layer, KV head) every block_size
tokens). The forward reads only fixed buffers, so on CUDA it is captured once per bucket as a CUDA
graph and replayed (one launch instead of hundreds); elsewhere the same code runs eagerly. Padding
rows write to and attend to a scratch block that the block manager never hands out. Attention goes
through paged_decode.py: a Triton kernel on CUDA, its PyTorch twin elsewhere.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from ..models.llama import LlamaModel
from .kv_pool import KVPool
from .paged_decode import paged_decode_attention
from .scheduler import ScheduledChunk
from .sequence import Sequence

UP_TO_DATE = sys.maxsize  # a BlockTable.changed_from once the device holds every column


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes with a graph of their own: powers of two, up to the first that holds max_num_seqs."""
    buckets = [1]
    while buckets[-1] < max_num_seqs:
        buckets.append(buckets[-1] * 2)
    return buckets


class DecodeInputs:
    """One bucket's fixed buffers."""

    def __init__(self, batch: int, num_layers: int, num_kv_heads: int, device: torch.device):
        self.batch = batch
        self.token_ids = torch.zeros(batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(batch, dtype=torch.int64, device=device)
        self.places = torch.zeros(batch, dtype=torch.int64, device=device)  # each row's place in the device tables
        self.lengths = torch.ones(num_layers, batch, num_kv_heads, dtype=torch.int32, device=device)

    @property
    def packed_size(self) -> int:
        return 3 * self.batch + self.lengths.numel()

    def fill(self, packed: torch.Tensor) -> None:
        """Spread the first packed_size values of a packed step (see StaticDecoder._pack) over the buffers."""
        batch = self.batch
        for index, buffer in enumerate((self.token_ids, self.positions, self.places)):
            buffer.copy_(packed[index * batch : (index + 1) * batch])
        self.lengths.copy_(packed[3 * batch : self.packed_size].view_as(self.lengths))


class StaticAttention:
    """The model's attention callable for one bucket: store the new entries, attend over the pool."""

    def __init__(self, pool: KVPool, tables: torch.Tensor, inputs: DecodeInputs, width: int, sliding_window: int | None):
        """`tables` [layers, places, kv_heads, columns]: the device block tables; `width`: the columns read
        (all of them in a graph, where the kernel stops at the lengths)."""
        self.pool, self.tables, self.inputs, self.width = pool, tables, inputs, width
        self.window = sliding_window or 0

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool, inputs = self.pool, self.inputs
        tables = self.tables[layer, :, :, : self.width].index_select(0, inputs.places)  # [rows, kv_heads, width]
        lengths = inputs.lengths[layer]
        newest = lengths.long() - 1  # this step's entry: the last of each (row, KV head)
        blocks = tables.gather(-1, (newest // pool.block_size).unsqueeze(-1)).squeeze(-1).long()
        slots = blocks * pool.block_size + newest % pool.block_size
        pool.store(slots, k, v)
        pool.positions.view(-1)[slots] = inputs.positions.unsqueeze(-1).expand_as(slots)
        return paged_decode_attention(q, pool.keys, pool.values, tables, lengths, q.shape[-1] ** -0.5, self.window)


class StaticDecoder:
    def __init__(self, model: LlamaModel, pool: KVPool, max_num_seqs: int, max_model_len: int, scratch_block: int):
        """`scratch_block`: a pool block no sequence owns, where padding rows write and read."""
        self.model, self.pool, self.device = model, pool, pool.device
        cfg = model.config
        self.num_layers, self.num_kv_heads = cfg.num_layers, cfg.num_kv_heads
        self.buckets = decode_buckets(max_num_seqs)
        self.num_places = self.buckets[-1]  # one per row of the biggest bucket; the place after them is padding's
        self.columns = -(-max_model_len // pool.block_size)  # the most blocks one (layer, KV head) holds
        self.tables = torch.full((self.num_layers, self.num_places + 1, self.num_kv_heads, self.columns), scratch_block,
                                 dtype=torch.int32, device=self.device)
        self._owners: list[Sequence | None] = [None] * self.num_places
        self._place_of: dict[int, int] = {}  # by id() of a sequence in _owners (which keeps it alive)
        self.uses_graphs = self.device.type == "cuda"
        self.inputs: dict[int, DecodeInputs] = {}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = None  # one memory pool for every bucket's graph (one replays at a time)
        self._host = torch.empty(0, dtype=torch.int64)
        self._device_packed = torch.empty(0, dtype=torch.int64, device=self.device)
        self._sent = None  # on CUDA, an event: the last transfer has left the host buffer

    def takes(self, chunks: list[ScheduledChunk]) -> bool:
        """Whether the step is plain decoding that fits a bucket."""
        return len(chunks) <= self.buckets[-1] and all(
            c.draft is None and c.num_tokens == 1 and not c.seq.want_prompt_logits for c in chunks
        )

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def forward(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits [len(chunks), vocab] of one decoding token per chunk, in order; each chunk's entry is
        appended to its sequence's block table here."""
        batch = self.bucket(len(chunks))
        if batch not in self.inputs:
            self.inputs[batch] = DecodeInputs(batch, self.num_layers, self.num_kv_heads, self.device)
        inputs = self.inputs[batch]
        packed, num_updates, width = self._pack(chunks, inputs)
        if self.device.type != "cpu":
            packed = self._send(packed)
        inputs.fill(packed)
        if num_updates:
            updates = packed[inputs.packed_size :]
            self.tables.view(-1)[updates[:num_updates]] = updates[num_updates:].to(torch.int32)
        if not self.uses_graphs:
            return self._forward(inputs, width)[: len(chunks)]
        if batch not in self.graphs:
            self.graphs[batch] = self._capture(inputs)
        graph, logits = self.graphs[batch]
        graph.replay()
        return logits[: len(chunks)]

    def _forward(self, inputs: DecodeInputs, width: int) -> torch.Tensor:
        attention = StaticAttention(self.pool, self.tables, inputs, width, self.model.config.sliding_window)
        return self.model(inputs.token_ids, inputs.positions, attention)

    def _capture(self, inputs: DecodeInputs) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (kernel compilation, cuBLAS workspaces), then record the forward.
        The warm-up computes this very step, so the entries it writes are the ones the replay writes."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(inputs, self.columns)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = self._forward(inputs, self.columns)
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

    def _host_buffer(self, size: int) -> np.ndarray:
        """The pinned host buffer (on CUDA), at least `size` long, once the last transfer has left it."""
        if self._sent is not None:
            self._sent.synchronize()  # long done by now: the last step read its tokens back
        if len(self._host) < size:
            self._host = torch.empty(2 * size, dtype=torch.int64, pin_memory=self.device.type == "cuda")
            self._host_array = self._host.numpy()
        return self._host_array

    def _place(self, seq: Sequence, taken: set[int]) -> int:
        """The sequence's place in the device tables; a new one (all its columns to send) if it has none,
        taken back if need be from a sequence not in this step (finished, preempted or prefilling)."""
        place = self._place_of.get(id(seq))
        if place is not None:
            return place
        free = [p for p in range(self.num_places) if p not in taken]
        place = next((p for p in free if self._owners[p] is None), free[0])
        if self._owners[place] is not None:
            del self._place_of[id(self._owners[place])]
        self._owners[place], self._place_of[id(seq)] = seq, place
        seq.block_table.changed_from = 0
        return place

    def _pack(self, chunks: list[ScheduledChunk], inputs: DecodeInputs) -> tuple[torch.Tensor, int, int]:
        """The step's inputs, padded to the bucket, as one int64 tensor: token ids, positions, places
        [batch], lengths [layers, batch, kv_heads], then the changed table entries (flat indices into
        the device tables, then their block ids). Returns it, the number of changed entries and the
        columns any row uses."""
        batch, n = inputs.batch, len(chunks)
        taken = {self._place_of[id(c.seq)] for c in chunks if id(c.seq) in self._place_of}
        rows = np.zeros((3, batch), dtype=np.int64)
        lengths = np.ones((self.num_layers, batch, self.num_kv_heads), dtype=np.int64)
        rows[2, n:] = self.num_places  # padding's place
        indices, block_ids = [], []
        layer_place = np.arange(self.num_layers)[:, None, None] * (self.num_places + 1)
        head = np.arange(self.num_kv_heads)[None, :, None]
        width = 1
        for row, chunk in enumerate(chunks):
            seq, table = chunk.seq, chunk.seq.block_table
            place = self._place(seq, taken)
            taken.add(place)
            rows[:, row] = seq.token_ids[seq.num_processed], seq.num_processed, place
            table.append_slots(1)
            lengths[:, row] = table.lengths
            used = int(table.num_blocks.max())
            width = max(width, used)
            if table.changed_from < used:
                columns = np.arange(table.changed_from, used)[None, None, :]
                indices.append((((layer_place + place) * self.num_kv_heads + head) * self.columns + columns).ravel())
                block_ids.append(table.blocks[:, :, table.changed_from : used].ravel())
            table.changed_from = UP_TO_DATE
        num_updates = sum(map(len, indices))
        host = self._host_buffer(inputs.packed_size + 2 * num_updates)
        host[: 3 * batch] = rows.ravel()
        host[3 * batch : inputs.packed_size] = lengths.ravel()
        if num_updates:
            host[inputs.packed_size : inputs.packed_size + num_updates] = np.concatenate(indices)
            host[inputs.packed_size + num_updates : inputs.packed_size + 2 * num_updates] = np.concatenate(block_ids)
        return self._host[: inputs.packed_size + 2 * num_updates], num_updates, width
