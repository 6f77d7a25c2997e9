"""What the OpenAI-compatible routes accept, and the OpenAI-shaped errors they answer with."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..errors import ContextLengthError, RequestError
from ..sampling_params import MAX_LOGPROBS, SamplingParams

MAX_CHOICES = 16
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit

# OpenAI parameters tokensieve does not implement, with the value that asks for nothing (sent by some
# clients by default): that value, or null, is accepted; anything else is a 400 naming the parameter.
UNSUPPORTED = {
    "tools": None, "tool_choice": None, "functions": None, "function_call": None, "parallel_tool_calls": None,
    "response_format": None, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "suffix": None,
    "echo": False, "best_of": 1, "audio": None, "modalities": None, "prediction": None, "reasoning_effort": None,
    "store": False, "metadata": None, "service_tier": None, "web_search_options": None,
}


class APIError(Exception):
    """An error the server answers with, in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def request_error(exc: RequestError, prompt_field: str) -> APIError:
    """A 400 for a request the engine refused; `param` is the field its message starts with, or the
    prompt's field when it speaks of the prompt."""
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param=prompt_field, code="context_length_exceeded")
    message = str(exc)
    first_word = message.split(" ", 1)[0]
    param = first_word if first_word in _FIELD_NAMES else prompt_field if "prompt" in message else None
    return APIError(400, message, param=param)


def validation_error(errors: list[dict]) -> APIError:
    """A 400 for the first problem pydantic (or the JSON decoder) found in a request body."""
    error = errors[0]
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"][1:]).lstrip(".")
    kind = error["type"]
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({error.get('ctx', {}).get('error', error['msg'])})")
    if kind == "extra_forbidden":
        if str(error["loc"][-1]) in UNSUPPORTED:
            return APIError(400, f"parameter {path!r} is not supported by tokensieve", param=path)
        return APIError(400, f"unknown parameter {path!r}", param=path)
    if kind == "missing" and not path:
        return APIError(400, "the request body is missing: send a JSON object")
    if kind in ("model_type", "model_attributes_type", "dict_type") and not path:
        return APIError(400, "the request body must be a JSON object")
    if not path:  # a check across fields names its parameter in the error's context
        return APIError(400, error["msg"], param=error.get("ctx", {}).get("param"))
    name = str(error["loc"][-1])  # our own messages begin with the field's name: it becomes the full path
    message = path + error["msg"][len(name):] if error["msg"].startswith(name + " ") else f"{path}: {error['msg']}"
    return APIError(400, message, param=path)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, content: Any) -> Any:
        """OpenAI's list of {"type": "text", "text": ...} parts becomes one string."""
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.keys() == {"type", "text"} and p["type"] == "text" and isinstance(p["text"], str)
            for p in content
        ):
            return "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise PydanticCustomError("content_type", "content must be a string or a list of {'type': 'text', 'text': ...} parts")
        return content


class _GenerationRequest(_Strict):
    """Fields completions and chat completions share: OpenAI's, then tokensieve's extras."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: list[str] = []
    seed: int | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    speculate: bool | None = None
    priority: int = 0

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls_and_neutral_unsupported(cls, body: Any) -> Any:
        """A null asks for the default (OpenAI's parameters are nullable), and an unsupported parameter sent
        with the value that asks for nothing is dropped; other unsupported parameters stay and are refused."""
        if not isinstance(body, dict):
            return body
        return {k: v for k, v in body.items() if v is not None and not (k in UNSUPPORTED and v == UNSUPPORTED[k])}

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, stop: Any) -> Any:
        return [stop] if isinstance(stop, str) else stop

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, choice: int, max_tokens: int) -> SamplingParams:
        """The engine's SamplingParams of one choice (seed, seed + 1, ... when a seed is given).
        `num_logprobs` (each route's own): alternatives reported per token, 0 the chosen one's only, None none."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, seed=None if self.seed is None else self.seed + choice,
            stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, speculate=self.speculate,
            logprobs=self.num_logprobs,
        )


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        """A string, a list of one string, token ids, or a list of one list of token ids."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str) or (isinstance(prompt, list) and all(type(t) is int for t in prompt)):
            return prompt
        raise PydanticCustomError(
            "prompt_type", "prompt must be a string or a list of token ids (or a list holding one of them)"
        )

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise PydanticCustomError("top_logprobs", "top_logprobs needs logprobs set to true", {"param": "top_logprobs"})
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat(self) -> list[dict[str, str]]:
        return [m.model_dump() for m in self.messages]


class EmbeddingRequest(_Strict):
    model: str | None = None
    input: list[str] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None  # None: float
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        """A string, a list of strings, token ids or a list of token id lists; always a list of inputs after."""
        if isinstance(value, str) or (isinstance(value, list) and value and all(type(t) is int for t in value)):
            value = [value]
        texts = isinstance(value, list) and all(isinstance(t, str) for t in value)
        token_lists = isinstance(value, list) and all(isinstance(t, list) and all(type(i) is int for i in t) for t in value)
        if not value or not (texts or token_lists):
            raise PydanticCustomError("input_type", "input must be a string, a list of strings, a list of token ids or "
                                                    "a list of token id lists, and not empty")
        if len(value) > MAX_EMBEDDING_INPUTS:
            raise PydanticCustomError("input_length", f"input must hold at most {MAX_EMBEDDING_INPUTS} items")
        empty = [i for i, item in enumerate(value) if len(item) == 0]
        if empty:
            raise PydanticCustomError("input_empty", f"input must not hold empty items (item {empty[0]} is empty)")
        return value


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None

    @model_validator(mode="after")
    def _exactly_one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("tokenize_input", "give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


_FIELD_NAMES = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
