"""POST /v1/embeddings: an encoder (tokensieve.Embedder) served beside the LLM. Its forwards run one
at a time on a thread of their own, never on the event loop nor on the engine thread."""

from __future__ import annotations

import asyncio
import base64
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import APIRouter, Request

from ..embedder import Embedder
from ..errors import RequestError
from .protocol import APIError, EmbeddingRequest

router = APIRouter(prefix="/v1")


class EmbeddingWorker:
    """The embedder a server serves, under its name, and the thread that runs it."""

    def __init__(self, embedder: Embedder):
        self.embedder, self.name = embedder, embedder.name
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tokensieve-embed")

    def check(self, model: str | None, dimensions: int | None) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"the embedding model {model!r} does not exist; this server embeds with {self.name!r}",
                           param="model", code="model_not_found")
        if dimensions is not None and dimensions != self.embedder.dimension:
            raise APIError(400, f"dimensions must be {self.embedder.dimension} for {self.name!r} (it does not shorten "
                                f"its vectors), got {dimensions}", param="dimensions")

    async def embed(self, inputs: list[str] | list[list[int]]) -> tuple[torch.Tensor, int]:
        """The vectors [len(inputs), dimension] of texts or token id lists, and the number of tokens embedded."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._embed, inputs)
        except RequestError as exc:
            raise APIError(400, str(exc), param="input") from None

    def _embed(self, inputs: list[str] | list[list[int]]) -> tuple[torch.Tensor, int]:
        token_ids = self.embedder.tokenize(inputs) if isinstance(inputs[0], str) else inputs
        return self.embedder.encode_tokens(token_ids), sum(len(ids) for ids in token_ids)

    def stop(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _encode(vector: torch.Tensor, encoding_format: str | None) -> list[float] | str:
    """A vector as floats (the default), or as base64 of its little-endian float32 bytes (as the openai client
    decodes them)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


@router.post("/embeddings")
async def create_embeddings(body: EmbeddingRequest, request: Request) -> dict:
    state = request.app.state.server
    worker = state.embedding_worker()
    worker.check(body.model, body.dimensions)
    vectors, num_tokens = await worker.embed(body.input)
    state.metrics.embedding_requests.labels(worker.name).inc()
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                 for i, v in enumerate(vectors)],
        "model": worker.name,
        "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
    }
