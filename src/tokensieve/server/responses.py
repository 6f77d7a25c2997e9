"""OpenAI's response and stream-chunk shapes for chat completions and completions, logprobs included."""

from __future__ import annotations

import time
from typing import Sequence

from ..outputs import RequestOutput, TokenLogprob

MIN_LOGPROB = -9999.0  # JSON has no -inf


def usage(prompt_tokens: int, finals: Sequence[RequestOutput]) -> dict:
    """Token counts of a request: its prompt once, the tokens of every choice."""
    completion_tokens = sum(len(out.token_ids) for out in finals)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": finals[0].num_cached_tokens},
    }


class TokenTexts:
    """Each token's own text, decoded once."""

    def __init__(self, tokenizer):
        self._tokenizer, self._texts = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self._texts:
            self._texts[token_id] = self._tokenizer.decode([token_id])
        return self._texts[token_id]


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


class _Shapes:
    object: str
    chunk_object: str

    def __init__(self, response_id: str, model: str, token_text: TokenTexts, logprobs: bool):
        self.response_id, self.model, self.token_text, self.logprobs = response_id, model, token_text, logprobs
        self.created = int(time.time())

    def _envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.response_id, "object": object_name, "created": self.created, "model": self.model, "choices": choices}

    def response(self, finals: Sequence[RequestOutput], prompt_tokens: int) -> dict:
        choices = [self.choice(index, out) for index, out in enumerate(finals)]
        return {**self._envelope(self.object, choices), "usage": usage(prompt_tokens, finals)}

    def chunk(self, choices: list[dict], with_usage_field: bool) -> dict:
        """A stream chunk; with stream_options.include_usage every chunk carries "usage": null until the last."""
        return {**self._envelope(self.chunk_object, choices), **({"usage": None} if with_usage_field else {})}

    def usage_chunk(self, finals: Sequence[RequestOutput], prompt_tokens: int) -> dict:
        return {**self._envelope(self.chunk_object, []), "usage": usage(prompt_tokens, finals)}


class ChatShapes(_Shapes):
    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def choice(self, index: int, final: RequestOutput) -> dict:
        return {
            "index": index,
            "message": {"role": "assistant", "content": final.text},
            "logprobs": self._logprobs(final.logprobs) if self.logprobs else None,
            "finish_reason": final.finish_reason,
        }

    def chunk_choice(self, index: int, out: RequestOutput, new_logprobs: list[TokenLogprob], first: bool) -> dict:
        delta = {"role": "assistant", "content": out.delta_text} if first else {"content": out.delta_text}
        return {
            "index": index,
            "delta": delta,
            "logprobs": self._logprobs(new_logprobs) if self.logprobs else None,
            "finish_reason": out.finish_reason if out.finished else None,
        }

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode())}

    def _logprobs(self, entries: list[TokenLogprob]) -> dict:
        return {"content": [
            {**self._entry(e.token_id, e.logprob), "top_logprobs": [self._entry(t, lp) for t, lp in e.top]} for e in entries
        ]}


class CompletionShapes(_Shapes):
    object, chunk_object = "text_completion", "text_completion"

    def __init__(self, response_id: str, model: str, token_text: TokenTexts, logprobs: bool):
        super().__init__(response_id, model, token_text, logprobs)
        self._text_offsets: dict[int, int] = {}  # per choice: characters of the tokens already reported

    def choice(self, index: int, final: RequestOutput) -> dict:
        return {
            "index": index,
            "text": final.text,
            "logprobs": self._logprobs(index, final.logprobs) if self.logprobs else None,
            "finish_reason": final.finish_reason,
        }

    def chunk_choice(self, index: int, out: RequestOutput, new_logprobs: list[TokenLogprob], first: bool) -> dict:
        return {
            "index": index,
            "text": out.delta_text,
            "logprobs": self._logprobs(index, new_logprobs) if self.logprobs else None,
            "finish_reason": out.finish_reason if out.finished else None,
        }

    def _logprobs(self, index: int, entries: list[TokenLogprob]) -> dict:
        tokens = [self.token_text(e.token_id) for e in entries]
        offsets, offset = [], self._text_offsets.get(index, 0)
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        self._text_offsets[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": [_logprob(e.logprob) for e in entries],
            "top_logprobs": [{self.token_text(t): _logprob(lp) for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }
