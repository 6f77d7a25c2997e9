"""What the routes share: the model once it has loaded, the thread that owns its engine, the embedding
model if one is served, the metrics, and the server's settings (served name, API key, queue limit)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from typing import Callable

from ..embedder import Embedder
from ..errors import ConfigError, ContextLengthError, RequestError
from ..llm import LLM
from .embeddings import EmbeddingWorker
from .engine_thread import EngineThread
from .metrics import ServerMetrics
from .protocol import APIError, request_error
from .responses import TokenTexts

log = logging.getLogger("tokensieve.server")


class ServerState:
    def __init__(self, served_model_name: str, api_key: str | None, max_queue: int):
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ConfigError(f"max_queue must be a positive integer, got {max_queue!r}")
        self.served_model_name, self.api_key, self.max_queue = served_model_name, api_key, max_queue
        self.llm: LLM | None = None
        self.engine_thread: EngineThread | None = None
        self.token_texts: TokenTexts | None = None
        self.embedding: EmbeddingWorker | None = None
        self.load_error: BaseException | None = None
        self.metrics = ServerMetrics(lambda: self.engine_thread.snapshot if self.engine_thread else None, served_model_name)

    # ---- the model --------------------------------------------------------------------------------
    def attach(self, llm: LLM, embedder: Embedder | None = None) -> None:
        """Start serving `llm` (its engine gets a thread of its own) and `embedder` if given."""
        if embedder is not None:
            self.embedding = EmbeddingWorker(embedder)
        self.llm, self.token_texts = llm, TokenTexts(llm.tokenizer)
        engine_thread = EngineThread(llm.engine)
        engine_thread.start()
        self.engine_thread = engine_thread  # set last: the routes take a set engine_thread to mean ready

    def load_in_background(self, load: Callable[[], LLM], load_embedder: Callable[[], Embedder | None]) -> None:
        """Load the embedder (the smaller, so that a bad path fails fast), then the LLM, on a thread."""

        def run() -> None:
            try:
                embedder = load_embedder()
                self.attach(load(), embedder)
            except BaseException as exc:
                self.load_error = exc
                log.error("the model failed to load: %s", exc)

        threading.Thread(target=run, name="tokensieve-load", daemon=True).start()

    def stop(self) -> None:
        if self.engine_thread is not None:
            self.engine_thread.stop()
        if self.embedding is not None:
            self.embedding.stop()

    def ready(self) -> EngineThread:
        """The engine thread, or a 503 while the model loads (or failed to) and once the thread has stopped."""
        if self.engine_thread is None:
            reason = f"the model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, reason, type="server_error", code="model_not_ready", headers={"Retry-After": "5"})
        if not self.engine_thread.is_alive():
            raise APIError(503, "the engine thread has stopped", type="server_error", code="engine_stopped")
        return self.engine_thread

    def embedding_worker(self) -> EmbeddingWorker:
        """The embedding model, a 503 while the models load, or a 404 when the server has none."""
        if self.embedding is None:
            if self.engine_thread is None:
                self.ready()  # raises the 503 of a server still loading, or failed to
            raise APIError(404, "this server serves no embedding model: start it with "
                                "`tokensieve serve --embedding-model all-minilm-l6-v2` (or another encoder)",
                           param="model", code="model_not_found")
        return self.embedding

    @property
    def max_model_len(self) -> int:
        return self.llm.engine.max_model_len

    def max_tokens(self, requested: int | None, prompt_tokens: int, prompt_field: str) -> int:
        """Tokens a request may generate: as many as asked if prompt and answer fit the context window
        (else a 400), by default what is left of the window (vLLM's choice) or of a smaller KV pool."""
        if requested is None:
            return max(1, self.llm.engine.max_request_tokens - prompt_tokens)
        if prompt_tokens + requested > self.max_model_len:
            raise request_error(ContextLengthError(self.max_model_len, prompt_tokens + requested, (
                f"maximum context length is {self.max_model_len} tokens; your request has {prompt_tokens + requested} "
                f"tokens ({prompt_tokens} in the prompt, {requested} to generate)"
            )), prompt_field)
        return requested

    def encode(self, prompt: str | list[int] | list[dict], prompt_field: str) -> list[int]:
        """Token ids of text, of a chat (through the chat template), or token ids as given."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        try:
            return self.llm.encode(prompt)
        except RequestError as exc:
            raise request_error(exc, prompt_field) from None

    # ---- the request ------------------------------------------------------------------------------
    def check_api_key(self, authorization: str | None) -> None:
        if self.api_key is None:
            return
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(
                401, "missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(
                404, f"the model {model!r} does not exist; this server serves {self.served_model_name!r}",
                param="model", code="model_not_found",
            )

    def client(self, user: str | None) -> str:
        """The fairness identity: `user` when given, else the API key's fingerprint, else "anonymous"."""
        if user:
            return user
        if self.api_key is not None:
            return "key-" + hashlib.sha256(self.api_key.encode()).hexdigest()[:8]
        return "anonymous"
