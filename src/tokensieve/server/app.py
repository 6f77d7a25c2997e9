"""The FastAPI app: OpenAI-compatible routes under /v1 (embeddings in embeddings.py), tokenizer routes, health,
metrics, stats, the chat page."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..embedder import Embedder
from ..errors import RequestError
from ..llm import LLM
from .admission import check_admission
from .embeddings import router as embeddings_router
from .generation import ClientDisconnected, Generation, PROMPT_FIELDS
from .protocol import (
    APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, request_error, validation_error,
)
from .responses import ChatShapes, CompletionShapes
from .state import ServerState
from .streaming import GenerationStream, stream_events

INDEX_HTML = Path(__file__).parent / "static" / "index.html"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer


def _state(request: Request) -> ServerState:
    return request.app.state.server


class RequireAPIKey:
    """Checks the key of every /v1 request before anything else reads it (a malformed body of a caller
    without the key is a 401, not a 400)."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            try:
                self.state.check_api_key(Headers(scope=scope).get("authorization"))
            except APIError as error:
                return await _error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


v1 = APIRouter(prefix="/v1")
root = APIRouter()


@v1.get("/models")
async def list_models(request: Request) -> dict:
    state = _state(request)
    model = {"id": state.served_model_name, "object": "model", "created": 0, "owned_by": "tokensieve"}
    if state.engine_thread is not None:
        model["max_model_len"] = state.max_model_len
    models = [model]
    if state.embedding is not None:
        models.append({"id": state.embedding.name, "object": "model", "created": 0, "owned_by": "tokensieve"})
    return {"object": "list", "data": models}


@v1.post("/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    return await _generate(request, body, "completion", body.prompt)


@v1.post("/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    return await _generate(request, body, "chat", body.chat())


async def _generate(request: Request, body: CompletionRequest | ChatCompletionRequest, kind: str, prompt) -> Response:
    state = _state(request)
    engine_thread = state.ready()
    state.check_model(body.model)
    prompt_token_ids = state.encode(prompt, PROMPT_FIELDS[kind])
    max_tokens = state.max_tokens(body.requested_max_tokens, len(prompt_token_ids), PROMPT_FIELDS[kind])
    try:
        params = [body.sampling_params(choice, max_tokens) for choice in range(body.n)]
    except RequestError as exc:
        raise request_error(exc, PROMPT_FIELDS[kind]) from None
    client = state.client(body.user)
    check_admission(engine_thread.waiting_by_client(), client, state.max_queue)
    generation = await Generation.start(engine_thread, state.metrics, kind, prompt_token_ids, params, client, body.priority)
    shapes_type = ChatShapes if kind == "chat" else CompletionShapes
    shapes = shapes_type(generation.response_id, state.served_model_name, state.token_texts, body.num_logprobs is not None)
    if body.stream:
        return GenerationStream(generation, stream_events(generation, shapes, len(prompt_token_ids), body.include_usage))
    try:
        finals = await generation.finals(request.receive)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        generation.abort()
    return JSONResponse(shapes.response(finals, len(prompt_token_ids)))


@root.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    state = _state(request)
    state.ready()
    state.check_model(body.model)
    if body.prompt is not None:
        token_ids = state.encode(body.prompt, "prompt")
    else:
        token_ids = state.encode([m.model_dump() for m in body.messages], "messages")
    return {"tokens": token_ids, "count": len(token_ids), "max_model_len": state.max_model_len}


@root.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    state = _state(request)
    state.ready()
    state.check_model(body.model)
    vocab_size = state.llm.engine.model.config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"token ids out of range [0, {vocab_size}): {bad[:5]}", param="tokens")
    return {"prompt": state.llm.tokenizer.decode(body.tokens)}


@root.get("/health")
async def health(request: Request) -> JSONResponse:
    state = _state(request)
    if state.load_error is not None:
        return JSONResponse({"status": "failed", "error": str(state.load_error)}, status_code=503)
    if state.engine_thread is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    if not state.engine_thread.is_alive():
        return JSONResponse({"status": "failed", "error": "the engine thread has stopped"}, status_code=503)
    return JSONResponse({"status": "ok"})


@root.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@root.get("/stats")
async def stats(request: Request) -> dict:
    """The engine's latest stats and tokens generated per second over the last few seconds (for the chat page)."""
    state = _state(request)
    if state.engine_thread is None:
        return {"ready": False, "model": state.served_model_name}
    snapshot = {k: v for k, v in state.engine_thread.snapshot.items() if k != "waiting_by_client"}  # names clients
    return {
        "ready": True, "model": state.served_model_name, "max_model_len": state.max_model_len,
        "max_queue": state.max_queue, **snapshot, "generation_tokens_per_second": state.engine_thread.generation_rate(),
    }


@root.get("/", include_in_schema=False)
async def index() -> Response:
    if not INDEX_HTML.is_file():
        raise APIError(404, "the chat page is not installed", type="not_found_error")
    return FileResponse(INDEX_HTML)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _error_response(exc)


async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(validation_error(exc.errors()))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _error_response(APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    return _error_response(APIError(500, f"the server failed: {exc!r}", type="server_error"))


def _loader(model):
    """A function that loads `model`, or that gives it as it is if it is loaded (or None)."""
    return model if callable(model) else lambda: model


def create_app(llm: LLM | Callable[[], LLM], *, served_model_name: str, api_key: str | None = None,
               max_queue: int = 64, embedder: Embedder | Callable[[], Embedder] | None = None) -> FastAPI:
    """The server's app over a loaded `llm`, or over a function that loads one: the app then loads it in the
    background when it starts, and /health answers 503 until it is ready. An `embedder` (or a function that
    loads one, in the background too) answers /v1/embeddings under its name."""
    state = ServerState(served_model_name, api_key, max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if isinstance(llm, LLM) and not callable(embedder):
            state.attach(llm, embedder)
        else:
            state.load_in_background(_loader(llm), _loader(embedder))
        yield
        state.stop()

    app = FastAPI(title="tokensieve", lifespan=lifespan)
    app.state.server = state
    app.include_router(v1)
    app.include_router(embeddings_router)
    app.include_router(root)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(RequireAPIKey, state=state)
    return app
