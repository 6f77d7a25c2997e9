"""The systems `bench longctx` compares, each answering a Case the same way: prefill the context
(compressed by the system's KV method), then the question, then greedy decoding; or, for
perplexity, score the continuation after the compressed context.

- ours: the tokensieve engine with a KV policy, or with block selection over the full cache, in the
  engine's KV dtype or a quantized one (label "+int8", "+int4");
- transformers: the same weights with a full DynamicCache (the baseline);
- kvpress: transformers plus one of kvpress's presses, applied while the context is prefilled.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import dataclass

import torch

from ..config import KVPolicyConfig, KVSelectionConfig
from ..sampling_params import SamplingParams
from .longctx_tasks import Case

KVPRESS_CLASSES = {
    "snapkv": "SnapKVPress",
    "streaming_llm": "StreamingLLMPress",
    "tova": "TOVAPress",
    "knorm": "KnormPress",
    "expected_attention": "ExpectedAttentionPress",
    "keydiff": "KeyDiffPress",
    "kvzip": "KVzipPress",
}
DUO_SINKS, DUO_RECENT = 128, 256  # what a streaming head keeps under kvpress's DuoAttention (its on-the-fly sizes)


def _duo_attention(kvpress, ratio: float, head_scores: torch.Tensor):
    """kvpress's DuoAttention, the `ratio` of (layer, KV head) pairs with the lowest retrieval scores as
    streaming heads. The scores are our probe's (engine/head_probe.py): kvpress's own on-the-fly scoring
    reads the BookSum dataset from the Hub, which an offline machine cannot fetch."""
    press = kvpress.DuoAttentionPress(head_compression_ratio=ratio)
    streaming = torch.zeros(head_scores.numel(), dtype=torch.bool)
    streaming[torch.argsort(head_scores.flatten(), stable=True)[: round(head_scores.numel() * ratio)]] = True
    press.sink_size, press.recent_size, press.streaming_mask = DUO_SINKS, DUO_RECENT, streaming.view_as(head_scores)
    press.post_init_from_model = lambda model: None  # the heads are set above
    return press


# presses made otherwise, given kvpress, the share of the context to remove and the probe's retrieval scores per
# (layer, KV head): DuoAttention, and AdaKV over ExpectedAttention (kvpress's leaderboard pairing)
KVPRESS_MAKERS = {
    "duo_attention": _duo_attention,
    "adakv": lambda kvpress, ratio, _: kvpress.AdaKVPress(press=kvpress.ExpectedAttentionPress(compression_ratio=ratio)),
}
KVPRESSES = list(KVPRESS_CLASSES) + list(KVPRESS_MAKERS)


def make_press(kvpress, name: str, keep_ratio: float, head_scores: torch.Tensor | None = None):
    """kvpress's press `name` keeping about `keep_ratio` of the context (the KV bytes it holds are measured);
    DuoAttention needs `head_scores`."""
    if name in KVPRESS_MAKERS:
        return KVPRESS_MAKERS[name](kvpress, 1.0 - keep_ratio, head_scores)
    return getattr(kvpress, KVPRESS_CLASSES[name])(compression_ratio=1.0 - keep_ratio)


@dataclass
class Answer:
    text: str | None  # None for perplexity cases
    perplexity: float | None
    prefill_seconds: float  # context and question, until the first token's logits
    decode_tokens_per_second: float | None
    kv_bytes: int  # KV cache bytes held while decoding (the most seen)
    kv_peak_bytes: int | None  # the most KV bytes held at any time, prefill included (when the system can tell)


def score(case: Case, answer: Answer) -> float:
    """Share of the expected strings found in the answer (perplexity cases have no score)."""
    found = [re.search(rf"(?<![0-9A-Za-z]){re.escape(a)}(?![0-9A-Za-z])", answer.text or "") for a in case.answers]
    return sum(1 for f in found if f) / len(found)


def _perplexity(logits: torch.Tensor, targets: list[int]) -> float:
    """exp of the mean negative log-likelihood of `targets`, where logits[i] predicts targets[i]."""
    nll = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets), reduction="mean")
    return math.exp(float(nll))


class OursSystem:
    system = "tokensieve"

    def __init__(self, llm, policy: KVPolicyConfig, query_aware: bool, selection: KVSelectionConfig | None = None,
                 kv_dtype: str | None = None):
        self.llm = llm.with_options(kv_policy=policy, kv_selection=selection, kv_dtype=kv_dtype or llm.engine.config.kv_dtype)
        self.label = (policy.label if selection is None else selection.label) + (f"+{kv_dtype}" if kv_dtype else "")
        self.query_aware = query_aware

    def answer(self, case: Case) -> Answer:
        if not case.answers:
            return self._perplexity(case)
        engine = self.llm.engine
        engine.block_manager.reset_peak()
        compress_len = None if self.query_aware else len(case.context_ids)
        params = SamplingParams(max_tokens=case.max_new_tokens, temperature=0)
        request_id = engine.add_request(case.context_ids + case.question_ids, params, compress_len=compress_len)
        kv_bytes, final = 0, None
        try:
            while final is None:
                for out in engine.step():
                    kv_bytes = max(kv_bytes, engine.kv_memory()["allocated_bytes"])
                    if out.finished:
                        final = out
        finally:
            engine.abort(request_id)
        m = final.metrics
        return Answer(
            final.text, None, m.time_to_first_token, m.decode_tokens_per_second, kv_bytes,
            engine.kv_memory()["peak_allocated_bytes"],
        )

    def _perplexity(self, case: Case) -> Answer:
        """The continuation is scored after the context is compressed; it is never compressed itself."""
        engine = self.llm.engine
        manager = engine.block_manager
        manager.reset_peak()
        start = time.perf_counter()
        request_id = engine.add_request(
            case.context_ids + case.question_ids, SamplingParams(max_tokens=1, temperature=0),
            want_prompt_logits=True, compress_len=len(case.context_ids),
        )
        try:
            seq, context_peak_blocks = engine.sequence(request_id), 0
            while engine.has_unfinished():
                if seq.num_processed == len(case.context_ids):  # the context is in, compressed
                    context_peak_blocks = manager.peak_used_blocks
                    manager.reset_peak()
                engine.step()
            logits = engine.prompt_logits(request_id)
        finally:
            engine.abort(request_id)
        kv_bytes = engine.pool.allocated_bytes(manager.peak_used_blocks, peak=True)  # the compressed context plus the continuation
        ppl = _perplexity(logits[len(case.context_ids) : -1], case.question_ids[1:])
        return Answer(None, ppl, time.perf_counter() - start, None, kv_bytes, max(engine.pool.allocated_bytes(context_peak_blocks, peak=True), kv_bytes))


class TransformersSystem:
    """transformers with a full cache, or with a kvpress press during the context's prefill."""

    def __init__(self, hf_model, tokenizer, press_name: str | None, keep_ratio: float | None, query_aware: bool,
                 head_scores: torch.Tensor | None = None):
        self.model, self.tokenizer = hf_model, tokenizer
        self.query_aware = query_aware
        self.press = None
        if press_name is None:
            self.system, self.label = "transformers", "full"
        else:
            import kvpress

            self.press = make_press(kvpress, press_name, keep_ratio, head_scores)
            self.system, self.label = "kvpress", f"{press_name}@{keep_ratio:g}x"

    @staticmethod
    def _cache_bytes(cache) -> int:
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)

    @torch.inference_mode()
    def answer(self, case: Case) -> Answer:
        from transformers import DynamicCache

        model = self.model
        context = case.context_ids + (case.question_ids if self.query_aware else [])
        question = [] if self.query_aware else case.question_ids
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        with self.press(model) if self.press is not None else contextlib.nullcontext():
            hidden = model.model(input_ids=torch.tensor([context]), past_key_values=cache).last_hidden_state
        positions = torch.arange(len(context), len(context) + len(question)).unsqueeze(0)
        if not case.answers:  # perplexity of the continuation, after the (compressed) context
            logits = model(input_ids=torch.tensor([question]), past_key_values=cache, position_ids=positions).logits[0]
            ppl = _perplexity(logits[:-1], question[1:])
            return Answer(None, ppl, time.perf_counter() - start, None, self._cache_bytes(cache), None)
        if question:
            logits = model(
                input_ids=torch.tensor([question]), past_key_values=cache, position_ids=positions, logits_to_keep=1
            ).logits[0, -1]
        else:
            logits = model.lm_head(hidden[0, -1])
        first_token_time = time.perf_counter()
        tokens = [int(logits.argmax())]
        position = len(context) + len(question)
        eos = self._eos_ids()
        while len(tokens) < case.max_new_tokens and tokens[-1] not in eos:
            logits = model(
                input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, position_ids=torch.tensor([[position]])
            ).logits[0, -1]
            tokens.append(int(logits.argmax()))
            position += 1
        decode_seconds = time.perf_counter() - first_token_time
        return Answer(
            self.tokenizer.decode(tokens, skip_special_tokens=True), None, first_token_time - start,
            (len(tokens) - 1) / decode_seconds if len(tokens) > 1 else None, self._cache_bytes(cache), None,
        )

    def _eos_ids(self) -> set[int]:
        configured = self.model.generation_config.eos_token_id
        ids = set(configured if isinstance(configured, list) else [configured]) | {self.tokenizer.eos_token_id}
        return ids - {None}
