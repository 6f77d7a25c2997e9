"""The engine loop: admit requests, schedule a step, run the model, sample, stop, report."""

from __future__ import annotations

import hashlib
import itertools
import logging
import secrets
import time

import numpy as np
import torch

from ..cache import cache_root
from ..config import DTYPES, QUANTIZED_KV_BITS, EngineConfig, SpeculativeConfig
from ..errors import ContextLengthError, RequestError
from ..kernels import native_kernels
from ..models.llama import LlamaModel
from ..outputs import RequestMetrics, RequestOutput, TokenLogprob
from ..sampling_params import SamplingParams
from ..speculative.latency import CONTEXTS as LATENCY_CONTEXTS, LatencyTable
from ..speculative.speculator import Speculator
from ..weights import load_model, load_tokenizer
from .block_manager import BlockManager
from .context_repeat import ContextRepeat
from .fairness import make_fairness
from .head_probe import HeadProbe, probe_file
from .kv_compression import KVCompressor
from .kv_pool import KVPool
from .latency_probe import LatencyProbe
from .output_text import OutputText
from .quantized_kv_pool import QuantizedKVPool
from .runner import ModelRunner
from .sampler import sample_tokens
from .scheduler import ScheduledChunk, Scheduler
from .sequence import Sequence
from .static_decode import StaticDecoder

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, model: str | LlamaModel, config: EngineConfig | None = None, tokenizer=None):
        """`model` is an alias, path, or an already loaded LlamaModel (then pass its tokenizer too)."""
        self.config = config = config or EngineConfig()
        self.device = torch.device(config.device)
        self.kernels = native_kernels() if config.wants_native_kernels else None
        if isinstance(model, LlamaModel):
            self.model = model.to(device=self.device, dtype=config.torch_dtype)
            self.tokenizer = tokenizer
        else:
            self.model = load_model(model, config.torch_dtype, config.device, self.kernels, config.activations)
            self.tokenizer = load_tokenizer(model)
        # what the matmuls take, "auto" resolved: int8 rows, or the model's dtype
        self.activations = "int8" if self.model.activations == "int8" else config.dtype
        if config.activations == "auto" and self.activations != "int8":
            log.info("%s activations: int8 needs the native CPU kernels (float32, CPU) and GGUF Q4_0/Q4_1/Q8_0 blocks "
                     "(kernels %s, device %s)", self.activations, "on" if self.kernels else "off", config.device)
        model_cfg = self.model.config
        self.max_model_len = min(config.max_model_len or model_cfg.max_position_embeddings, model_cfg.max_position_embeddings)
        # "auto": float16 entries on the int8 fast path (as llama.cpp stores its cache), else the model's dtype
        self.kv_dtype = config.kv_dtype if config.kv_dtype != "auto" else (
            "float16" if self.activations == "int8" else config.dtype
        )
        self.pool = self._make_pool(config, model_cfg.head_dim)
        policy = config.kv_policy
        evicts = policy is not None and policy.evicts
        if evicts and config.prefix_caching:
            log.warning("prefix caching is off: KV policy %r compresses each sequence's blocks, which then hold other "
                        "entries in each (layer, head) than a block key names", policy.name)
        # the static decode step's padding rows write to the pool's last block, which nobody is handed
        static = config.uses_static_decode
        self.block_manager = BlockManager(
            self.pool.num_blocks - static, config.block_size, model_cfg.num_layers, model_cfg.num_kv_heads,
            config.prefix_caching and not evicts,
            on_release=self.pool.release if isinstance(self.pool, QuantizedKVPool) else None,
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_batched_tokens, config.prefill_chunk_size,
            make_fairness(config.scheduling),
        )
        self.compressor = KVCompressor(policy, self.pool, self.block_manager, self.model.rotary) if evicts else None
        static_decoder = StaticDecoder(
            self.model, self.pool, config.max_num_seqs, self.max_model_len, config.max_batched_tokens,
            scratch_block=self.pool.num_blocks - 1,
        ) if static else None
        self.runner = ModelRunner(
            self.model, self.pool, self.block_manager, self.kernels, self.compressor, config.kv_selection, static_decoder
        )
        if self.compressor is not None and self.compressor.policy.reconstructs:
            self.compressor.reconstruct = ContextRepeat(self.compressor.policy, self.runner, self.block_manager, self.tokenizer)
        if self.compressor is not None and policy.retrieval_heads is not None:
            self.compressor.retrieval = self._retrieval_heads(policy.retrieval_heads)
        self.eos_token_ids = set(model_cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.speculator: Speculator | None = None  # made when the first speculating request arrives
        self._sequences: dict[str, Sequence] = {}
        self._texts: dict[str, OutputText] = {}
        self._arrivals = itertools.count()
        self.counts = dict.fromkeys(("steps", "generation_tokens", "spec_draft_tokens", "spec_accepted_tokens"), 0)

    # ---- requests -------------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        want_prompt_logits: bool = False,
        compress_len: int | None = None,
        *,
        client: str = "default",
        priority: int = 0,
    ) -> str:
        """Queue a request; raises RequestError (and changes nothing) if it cannot be served.

        `compress_len`: only the first that many prompt tokens are compressed by the KV policy while
        prefilling (the context); the rest (the question) is seen after compression: query-agnostic.
        `client` names who sent it (fair scheduling shares the engine between clients); `priority`
        orders that client's requests (lower first).
        """
        self._validate(prompt_token_ids, params, want_prompt_logits)
        if compress_len is not None and not (isinstance(compress_len, int) and 1 <= compress_len <= len(prompt_token_ids)):
            raise RequestError(f"compress_len must be in [1, {len(prompt_token_ids)}] (the prompt's length), got {compress_len!r}")
        if not isinstance(priority, int):
            raise RequestError(f"priority must be an integer, got {priority!r}")
        request_id = request_id or f"req-{secrets.token_hex(6)}"
        if request_id in self._sequences:
            raise RequestError(f"request id {request_id!r} is already in use")
        seq = Sequence(
            request_id, list(prompt_token_ids), params, next(self._arrivals),
            seed=params.seed if params.seed is not None else secrets.randbits(63),
            want_prompt_logits=want_prompt_logits,
            compress_len=(compress_len or len(prompt_token_ids)) if self.compressor else None,
            # a request that asks for logprobs decodes plainly: verification does not compute them
            speculates=params.logprobs is None and (
                params.speculate if params.speculate is not None else self.config.speculative is not None
            ),
            client=str(client),
            priority=priority,
            logprobs=[] if params.logprobs is not None else None,
        )
        seq.shares_prefix = self.block_manager.prefix_cache is not None and not want_prompt_logits
        if seq.speculates:
            self._speculator().prepare(seq)
        self._sequences[request_id] = seq
        self._texts[request_id] = OutputText(self.tokenizer, seq.prompt_token_ids, params.stop)
        self.scheduler.add(seq)
        return request_id

    def _speculator(self) -> Speculator:
        if self.speculator is None:
            config = (self.config.speculative or SpeculativeConfig()).on_device(self.config.device)
            fingerprint = hashlib.sha256(repr((
                self.model.config, self.config.dtype, self.activations, self.kv_dtype, self.config.device, self.config.block_size,
                getattr(self.kernels, "__file__", None), torch.get_num_threads(), LATENCY_CONTEXTS,
            )).encode()).hexdigest()[:16]
            latency = LatencyTable(
                LatencyProbe(self.runner, self.block_manager, self.model.config.vocab_size, self.max_model_len),
                lambda batch: min(batch * config.max_nodes, self.config.max_batched_tokens - batch),
                cache_root() / "speculative" / f"latency-{fingerprint}.json",
            )
            self.speculator = Speculator(config, self.model.config.vocab_size, latency, self.max_model_len, self.kernels)
        return self.speculator

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams, want_prompt_logits: bool) -> None:
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        if len(prompt_token_ids) == 0:
            raise RequestError("the prompt is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        limit = self.max_model_len if want_prompt_logits else self.max_model_len - 1
        if len(prompt_token_ids) > limit:
            raise ContextLengthError(self.max_model_len, len(prompt_token_ids), (
                f"maximum context length is {self.max_model_len} tokens; your request has {len(prompt_token_ids)} "
                f"tokens in its prompt{'' if want_prompt_logits else ' (and at least one must be left to generate)'}"
            ))
        entries = min(len(prompt_token_ids) + params.max_tokens, self.max_model_len)
        if entries > self.max_request_tokens:
            blocks = -(-entries // self.config.block_size) * self.block_manager.blocks_per_group
            raise RequestError(
                f"the request may need {blocks} KV blocks ({entries} tokens) but the pool has "
                f"{self.block_manager.num_blocks}; raise kv_cache_bytes or lower max_tokens"
            )

    @property
    def max_request_tokens(self) -> int:
        """Prompt and output tokens one request may hold: the context window, or less when the pool is smaller."""
        pool_tokens = self.block_manager.num_blocks // self.block_manager.blocks_per_group * self.config.block_size
        return min(self.max_model_len, pool_tokens)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; unknown or finished ids are ignored."""
        seq = self._sequences.pop(request_id, None)
        self._texts.pop(request_id, None)
        if seq is not None:
            self.scheduler.remove(seq)
            seq.finish("abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def sequence(self, request_id: str) -> Sequence:
        """The engine's state of a request (progress, KV layout), for inspection."""
        return self._sequences[request_id]

    def prompt_logits(self, request_id: str) -> torch.Tensor:
        """All prompt-position logits [prompt tokens, vocab] of a finished want_prompt_logits request."""
        seq = self._sequences[request_id]
        return torch.cat(seq.prompt_logits)[: seq.num_prompt_tokens]

    def release(self, request_id: str) -> None:
        """Forget a finished request (its outputs have been read)."""
        self._sequences.pop(request_id, None)
        self._texts.pop(request_id, None)

    # ---- the loop -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one forward; return an output for every request that gained tokens or finished."""
        began = time.perf_counter()
        drafted = self._draft()
        schedule = self.scheduler.schedule()
        for seq in drafted:
            seq.draft = None  # a draft the schedule did not take is stale by the next step
        if not schedule.chunks:
            return []
        self.counts["steps"] += 1
        if drafted:  # the tokens per sequence before the step, as drafting measures them
            context = sum(len(c.seq.token_ids) for c in schedule.chunks) / len(schedule.chunks)
        logits, chunk_rows = self.runner.run(schedule.chunks)
        verification_tops = iter(self._verification_top_tokens(logits, chunk_rows))
        outputs, sampled_seqs, sampled_rows = [], [], []
        for chunk, rows in chunk_rows:
            seq, completes = chunk.seq, chunk.completes_sequence
            if chunk.draft is not None:
                outputs.append(self._verify(chunk, logits[rows], next(verification_tops)))
                continue
            if seq.want_prompt_logits:
                seq.prompt_logits.append(logits[rows])
            if seq.speculates and rows.stop > rows.start:
                first_position = seq.num_processed + chunk.num_tokens - (rows.stop - rows.start)
                self.speculator.learn_prefill(seq.token_ids[first_position : seq.num_processed + chunk.num_tokens], logits[rows])
            seq.num_processed += chunk.num_tokens
            self.scheduler.cache_computed(seq)
            if self.compressor is not None:
                self.compressor.after_forward(seq)
            if completes:
                sampled_seqs.append(seq)
                sampled_rows.append(rows.stop - 1)
        if sampled_seqs:
            # each sampled row once; plain decoding samples the first rows (the static step's bucket pads
            # after them): then a view, with no copy and no index to send to the device
            first_rows = sampled_rows == list(range(len(sampled_rows)))
            sampled_logits = logits[: len(sampled_rows)] if first_rows else logits[sampled_rows]
            tokens = sample_tokens(sampled_logits, sampled_seqs, self.kernels)
            self._record_logprobs(sampled_logits, sampled_seqs, tokens)
            outputs += [self._append_tokens(seq, [token]) for seq, token in zip(sampled_seqs, tokens)]
        if drafted and all(c.draft is not None or c.num_tokens == 1 for c in schedule.chunks):
            rows = sum(c.num_tokens for c in schedule.chunks)
            self.speculator.observe_step(len(schedule.chunks), rows - len(schedule.chunks), context, time.perf_counter() - began)
        return outputs

    def retrieval_scores(self) -> torch.Tensor:
        """The retrieval-head probe's scores [layers, KV heads] of this model (measured once, then cached)."""
        probe = HeadProbe(self.runner, self.block_manager, self.model.config.vocab_size)
        return probe.scores(probe_file((self.model.config, self.config.dtype, self.activations, self.kv_dtype)))

    def _retrieval_heads(self, share: float) -> torch.Tensor:
        """The `share` of (layer, KV head) pairs the retrieval-head probe scores highest, as a bool mask."""
        scores = self.retrieval_scores()
        chosen = torch.zeros(scores.numel(), dtype=torch.bool)
        chosen[torch.argsort(scores.flatten(), descending=True, stable=True)[: max(1, round(share * scores.numel()))]] = True
        return chosen.view_as(scores)

    def _make_pool(self, config: EngineConfig, head_dim: int) -> KVPool:
        """The KV pool of self.kv_dtype, as many blocks as kv_cache_bytes holds."""
        selects = config.kv_selection is not None
        bits = QUANTIZED_KV_BITS.get(self.kv_dtype)
        pool_class, width = (KVPool, DTYPES[self.kv_dtype]) if bits is None else (QuantizedKVPool, bits)
        num_blocks = config.kv_cache_bytes // pool_class.block_bytes(config.block_size, head_dim, width, selects)
        num_blocks = max(1 + config.uses_static_decode, num_blocks)  # and the static step's scratch block
        return pool_class(num_blocks, config.block_size, head_dim, width, self.device, self.kernels, key_bounds=selects)

    def _draft(self) -> list[Sequence]:
        """Draft verification blocks for the speculating sequences that are decoding."""
        decoding = [s for s in self.scheduler.running if s.num_unprocessed == 1]
        speculating = [s for s in decoding if s.speculates]
        if speculating:
            self.speculator.draft(speculating, batch=len(decoding))
        return speculating

    def _verification_top_tokens(self, logits: torch.Tensor, chunk_rows) -> list[np.ndarray]:
        """Each verification block's rows' top tokens (Speculator.top_tokens), in the chunks' order: one
        call and one read-back for them all, over the run of rows from the first block to the last (a view
        of the logits: the few rows between them cost less than copying the blocks together)."""
        blocks = [rows for chunk, rows in chunk_rows if chunk.draft is not None]
        if not blocks:
            return []
        first = blocks[0].start
        top = self.speculator.top_tokens(logits[first : blocks[-1].stop])
        return [top[rows.start - first : rows.stop - first] for rows in blocks]

    def _verify(self, chunk: ScheduledChunk, logits: torch.Tensor, top: np.ndarray) -> RequestOutput:
        """Accept a path of the draft, keep its KV entries (moved into place), free the rest."""
        seq, block = chunk.seq, chunk.draft
        path, emitted = self.speculator.verify(seq, block, logits, top)
        source, destination = self.block_manager.keep_appended(seq.block_table, len(block), np.array(path))
        if len(source):
            self.pool.move(torch.from_numpy(source).to(self.device), torch.from_numpy(destination).to(self.device), seq.block_table)
        seq.num_processed += len(path)
        self.scheduler.cache_computed(seq)
        self.counts["spec_draft_tokens"] += len(block) - 1
        self.counts["spec_accepted_tokens"] += len(emitted) - 1
        if self.compressor is not None:
            self.compressor.after_forward(seq)
        return self._append_tokens(seq, emitted)

    def _append_tokens(self, seq: Sequence, tokens: list[int]) -> RequestOutput:
        """Append tokens one by one until the request stops; one output for them all."""
        text = self._texts[seq.request_id]
        params = seq.params
        for token in tokens:
            seq.append_token(token)
            self.counts["generation_tokens"] += 1
            self.scheduler.fairness.on_generated(seq, 1)
            if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
                seq.finish("stop")
            elif text.update(seq.token_ids):
                seq.finish("stop")
            elif seq.num_output_tokens >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
                seq.finish("length")
            if seq.is_finished:
                self.scheduler.remove(seq)
                break
        return self._output(seq, text)

    @staticmethod
    def _record_logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> None:
        """The model's log-probabilities (before any sampling setting) of each sampled token and its rivals."""
        rows = [i for i, seq in enumerate(seqs) if seq.logprobs is not None]
        if not rows:
            return
        logprobs = torch.log_softmax(logits[rows].float(), dim=-1)
        for row, seq_logprobs in zip(rows, logprobs):
            seq, token = seqs[row], tokens[row]
            top = torch.topk(seq_logprobs, seq.params.logprobs) if seq.params.logprobs else None
            seq.logprobs.append(TokenLogprob(
                token, float(seq_logprobs[token]),
                list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [],
            ))

    def _output(self, seq: Sequence, text: OutputText) -> RequestOutput:
        now = seq.finish_time or time.perf_counter()
        ttft = seq.first_token_time - seq.arrival_time if seq.first_token_time else None
        decode_time = now - seq.first_token_time if seq.first_token_time else 0.0
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            text=text.text,
            delta_text=text.take_delta(seq.is_finished),
            token_ids=seq.output_token_ids,  # a fresh list: the slice copies
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            metrics=RequestMetrics(
                time_to_first_token=ttft,
                total_time=now - seq.arrival_time,
                decode_tokens_per_second=(seq.num_output_tokens - 1) / decode_time if decode_time > 0 else None,
                queue_time=seq.first_scheduled_time - seq.arrival_time if seq.first_scheduled_time else None,
            ),
            logprobs=list(seq.logprobs[: seq.num_output_tokens]) if seq.logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens,
        )

    # ---- memory -------------------------------------------------------------------------
    def kv_memory(self) -> dict[str, int]:
        """Exact KV accounting in bytes: pool capacity, blocks handed out (now and at most since
        `block_manager.reset_peak()`), entries stored."""
        return {
            "capacity_bytes": self.pool.bytes_capacity,
            "allocated_bytes": self.pool.allocated_bytes(self.block_manager.num_used_blocks),
            "peak_allocated_bytes": self.pool.allocated_bytes(self.block_manager.peak_used_blocks, peak=True),
            "in_use_bytes": int(self.block_manager.num_stored_entries * self.pool.bytes_per_entry),
        }

    def stats(self) -> dict:
        """What a server reports: load, KV use, prefix-cache and speculation counts (cumulative ones since start)."""
        manager, scheduler, cache = self.block_manager, self.scheduler, self.block_manager.prefix_cache
        waiting_by_client: dict[str, int] = {}
        for seq in scheduler.waiting:
            waiting_by_client[seq.client] = waiting_by_client.get(seq.client, 0) + 1
        memory = self.kv_memory()
        return {
            "activations": self.activations,
            "kv_dtype": self.kv_dtype,
            "running": len(scheduler.running),
            "waiting": len(scheduler.waiting),
            "waiting_by_client": waiting_by_client,
            "kv_usage": manager.num_used_blocks / manager.num_blocks,
            "kv_in_use_bytes": memory["in_use_bytes"],
            "kv_allocated_bytes": memory["allocated_bytes"],
            "kv_capacity_bytes": memory["capacity_bytes"],
            "prefix_cache_queries": cache.num_queried_tokens if cache else 0,
            "prefix_cache_hits": cache.num_hit_tokens if cache else 0,
            "prompt_tokens": scheduler.num_prompt_tokens,
            "preemptions": scheduler.num_preemptions,
            "selected_decode_entries": self.runner.attended_entries,
            "stored_decode_entries": self.runner.stored_entries,
            "reused_block_choices": self.runner.reused_choices,
            **self.counts,
        }
