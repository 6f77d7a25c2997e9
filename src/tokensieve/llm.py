"""The Python entry point: `LLM(model=...).generate(prompts, SamplingParams(...))` and `.stream(...)`."""

from __future__ import annotations

from typing import Any, Iterator, Sequence as SequenceType

import torch

from .config import EngineConfig
from .engine.engine import LLMEngine
from .errors import ConfigError, RequestError
from .llm_embedding import embed_texts
from .outputs import RequestOutput
from .prompts import context_question_ids
from .sampling_params import SamplingParams
from .weights.packaged import DEFAULT_MODEL

# A prompt is text, a chat (list of {"role", "content"} messages), {"prompt_token_ids": [...]}, or
# {"context": text, "question": text}: one user turn whose context a KV policy compresses before the
# question is seen (query-agnostic); {"prompt_token_ids": [...], "compress_len": n} says the same in tokens.
Prompt = Any


def _is_chat(prompt: Prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu", **engine_options):
        self.engine = LLMEngine(model, EngineConfig(dtype=dtype, device=device, **engine_options))
        self.tokenizer = self.engine.tokenizer

    def with_options(self, **engine_options) -> "LLM":
        """A new LLM with other engine settings (pool size, chunking...) sharing these weights."""
        if {"dtype", "device", "native_kernels", "activations"} & engine_options.keys():
            raise ConfigError(
                "with_options shares the loaded weights: load the model again to change dtype, device, "
                "native_kernels or activations"
            )
        other = object.__new__(LLM)
        config = EngineConfig(**{**vars(self.engine.config), **engine_options})
        other.engine = LLMEngine(self.engine.model, config, self.tokenizer)
        other.tokenizer = self.tokenizer
        return other

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt; chats go through the model's chat template."""
        return self._encode_request(prompt)[0]

    def _encode_request(self, prompt: Prompt) -> tuple[list[int], int | None]:
        """Token ids and how many leading ones the KV policy compresses before the rest is seen (None: all)."""
        if isinstance(prompt, dict) and "context" in prompt and "question" in prompt:
            context_ids, question_ids = context_question_ids(self.tokenizer, prompt["context"], prompt["question"])
            return context_ids + question_ids, len(context_ids)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"]), prompt.get("compress_len")
        return self._encode_plain(prompt), None

    def _encode_plain(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids
        if _is_chat(prompt):
            if not prompt:
                raise RequestError("the chat has no messages")
            text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        raise RequestError(
            "a prompt must be a string, a chat (list of role/content messages), {'prompt_token_ids': [...]} "
            f"or {{'context': ..., 'question': ...}}, got {type(prompt).__name__}"
        )

    @staticmethod
    def _as_batch(prompts) -> list[Prompt]:
        single = isinstance(prompts, (str, dict)) or (bool(prompts) and _is_chat(prompts))
        return [prompts] if single else list(prompts)

    def generate(
        self, prompts: Prompt | SequenceType[Prompt], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched; outputs come back in the prompts' order."""
        batch = self._as_batch(prompts)
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(batch)
        if len(params_list) != len(batch):
            raise RequestError(f"{len(batch)} prompts but {len(params_list)} SamplingParams")
        encoded = [self._encode_request(p) for p in batch]
        request_ids: list[str] = []
        try:
            for (token_ids, compress_len), p in zip(encoded, params_list):
                request_ids.append(self.engine.add_request(token_ids, p, compress_len=compress_len))
            finals: dict[str, RequestOutput] = {}
            while len(finals) < len(request_ids):
                for out in self.engine.step():
                    if out.finished:
                        finals[out.request_id] = out
            return [finals[r] for r in request_ids]
        finally:
            for request_id in request_ids:
                self.engine.abort(request_id)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield an output (with its `delta_text`) each time the request gains text, until it finishes."""
        token_ids, compress_len = self._encode_request(prompt)
        request_id = self.engine.add_request(token_ids, params or SamplingParams(), compress_len=compress_len)
        try:
            finished = False
            while not finished:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        finished = out.finished
                        yield out
        finally:
            self.engine.abort(request_id)

    def prompt_logits(self, prompt: Prompt) -> torch.Tensor:
        """Logits [tokens, vocab] at every prompt position (for perplexity and reference checks)."""
        token_ids, compress_len = self._encode_request(prompt)
        request_id = self.engine.add_request(
            token_ids, SamplingParams(max_tokens=1, temperature=0), want_prompt_logits=True, compress_len=compress_len
        )
        try:
            while self.engine.has_unfinished():
                self.engine.step()
            return self.engine.prompt_logits(request_id)
        finally:
            self.engine.abort(request_id)

    def embed(
        self,
        texts: str | SequenceType[str],
        pooling: str = "last",
        prompt: str | None = None,
        normalize: bool = True,
        batch_size: int = 8,
    ) -> torch.Tensor:
        """Embeddings of texts from the final-norm hidden states, without generating or using the KV pool.

        Returns a float32 CPU tensor: [hidden] for one string, [len(texts), hidden] for a list.
        pooling: "last" (the last token's state) or "mean" (every token's, a BOS the tokenizer adds
        included). prompt: None (the text as is), "prompteol" ('This sentence: "{text}" means in one
        word:"', which helps models not trained to embed) or a template containing "{text}".
        normalize: L2-normalize each vector. batch_size: texts per forward (texts of similar lengths
        run together); lower it for long texts.
        """
        return embed_texts(
            self.engine.model, self.tokenizer, texts, pooling, prompt, normalize, batch_size, self.engine.max_model_len
        )
