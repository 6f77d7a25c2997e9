"""POST /v1/embeddings through the official openai client: one server holds the shared LLM and the
packaged all-MiniLM-L6-v2; its vectors must be the Embedder's."""

from __future__ import annotations

import base64
import threading

import numpy as np
import openai
import pytest

from test_server import POOL_BYTES, RunningServer, _error, _serve, _wait_until
from tokensieve.embedder import Embedder
from tokensieve.errors import ModelLoadError

NAME = "all-minilm-l6-v2"
TEXTS = ["The cat sat on the mat.", "A quick brown fox.", "Embeddings map text to vectors."]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(NAME)


@pytest.fixture(scope="module")
def expected() -> np.ndarray:
    return Embedder(NAME).encode(TEXTS)  # a model of its own: nothing shared with the server


@pytest.fixture(scope="module")
def server(llm, embedder):
    running = RunningServer(llm.with_options(kv_cache_bytes=POOL_BYTES), embedder=embedder)
    yield running
    running.stop()


def _vectors(reply) -> np.ndarray:
    assert [d.index for d in reply.data] == list(range(len(reply.data)))
    assert all(d.object == "embedding" for d in reply.data)
    return np.array([d.embedding for d in reply.data], dtype=np.float32)


def test_float_and_base64_are_the_embedders_vectors(server, embedder, expected):
    client = server.client()
    floats = client.embeddings.create(model=NAME, input=TEXTS, encoding_format="float")
    assert floats.object == "list" and floats.model == NAME
    np.testing.assert_allclose(_vectors(floats), expected, atol=1e-5)
    decoded = client.embeddings.create(model=NAME, input=TEXTS)  # the client asks for base64 and decodes it
    np.testing.assert_array_equal(_vectors(decoded), _vectors(floats))
    raw = client.embeddings.create(model=NAME, input=TEXTS, encoding_format="base64")
    as_bytes = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data]
    np.testing.assert_array_equal(np.stack(as_bytes), _vectors(floats))
    num_tokens = sum(len(ids) for ids in embedder.tokenize(TEXTS))  # [CLS] and [SEP] included
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == raw.usage.prompt_tokens == num_tokens
    single = client.embeddings.create(model=NAME, input=TEXTS[1], encoding_format="float", dimensions=384, user="u1")
    np.testing.assert_allclose(_vectors(single), expected[1:2], atol=1e-5)
    plain = server.http().post("/v1/embeddings", json={"input": TEXTS, "encoding_format": None}).json()  # float
    np.testing.assert_array_equal(np.array([d["embedding"] for d in plain["data"]], dtype=np.float32), _vectors(floats))


def test_token_id_input(server, embedder, expected):
    client = server.client()
    token_ids = embedder.tokenize(TEXTS)
    reply = client.embeddings.create(model=NAME, input=token_ids, encoding_format="float")
    np.testing.assert_allclose(_vectors(reply), expected, atol=1e-5)
    assert reply.usage.prompt_tokens == sum(len(ids) for ids in token_ids)
    one = client.embeddings.create(model=NAME, input=token_ids[2], encoding_format="float")
    np.testing.assert_allclose(_vectors(one), expected[2:], atol=1e-5)
    assert one.usage.total_tokens == len(token_ids[2])


def test_models_and_metrics_list_the_embedding_model(server):
    assert [m.id for m in server.client().models.list()] == ["smollm2-135m", NAME]
    server.client().embeddings.create(model=NAME, input="x")
    assert f'tokensieve:embedding_requests_total{{model_name="{NAME}"}}' in server.http().get("/metrics").text


def test_unknown_model(server):
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().embeddings.create(model="text-embedding-3-small", input=TEXTS)
    assert caught.value.code == "model_not_found" and "text-embedding-3-small" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        server.client().embeddings.create(model="smollm2-135m", input=TEXTS)  # the LLM does not embed here


@pytest.mark.parametrize("body, param, words", [
    ({"input": []}, "input", "not empty"),
    ({"input": ""}, "input", "item 0 is empty"),
    ({"input": ["a", ""]}, "input", "item 1 is empty"),
    ({"input": [[101, 102], []]}, "input", "item 1 is empty"),
    ({"input": ["a", [101, 102]]}, "input", "input must be a string, a list of strings"),
    ({"input": 3}, "input", "input must be a string"),
    ({"input": [101] * 257}, "input", "has 257 tokens; this model takes 1 to 256"),
    ({"input": [101, 10**6, 102]}, "input", "out of range"),
    ({"input": ["a"] * 2049}, "input", "at most 2048 items"),
    ({"input": "a", "encoding_format": "hex"}, "encoding_format", "'float' or 'base64'"),
    ({"input": "a", "dimensions": 128}, "dimensions", "dimensions must be 384"),
    ({"input": "a", "truncate": True}, "truncate", "unknown parameter"),
    ({}, "input", "Field required"),
])
def test_bad_requests_are_400_and_the_server_serves_on(server, expected, body, param, words):
    error = _error(server.http().post("/v1/embeddings", json={"model": NAME, **body}), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]
    reply = server.client().embeddings.create(model=NAME, input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(_vectors(reply), expected[:1], atol=1e-5)


def test_the_event_loop_answers_during_a_forward(server, monkeypatch):
    embedder, entered, release = server.app.state.server.embedding.embedder, threading.Event(), threading.Event()
    real_encode = embedder.encode_tokens

    def slow_encode(*args, **kwargs):
        entered.set()
        release.wait(30)
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(embedder, "encode_tokens", slow_encode)
    replies = []
    request = threading.Thread(target=lambda: replies.append(server.client().embeddings.create(model=NAME, input="hi")))
    request.start()
    try:
        assert entered.wait(30)
        assert server.http().get("/health").status_code == 200  # while the forward is blocked
        assert server.http().post("/tokenize", json={"prompt": "hi"}).status_code == 200
    finally:
        release.set()
        request.join(30)
    assert len(replies[0].data) == 1


def test_a_server_without_embedding_model_names_the_flag(llm):
    running = RunningServer(llm.with_options(kv_cache_bytes=POOL_BYTES))
    try:
        with pytest.raises(openai.NotFoundError) as caught:
            running.client().embeddings.create(model=NAME, input="x")
        assert "--embedding-model" in caught.value.message
        assert [m.id for m in running.client().models.list()] == ["smollm2-135m"]
    finally:
        running.stop()


def test_an_embedder_loaded_in_the_background(llm, embedder):
    loaded = threading.Event()

    def load_embedder():
        loaded.wait(30)
        return embedder

    running = RunningServer(llm.with_options(kv_cache_bytes=POOL_BYTES), embedder=load_embedder)
    try:
        http = running.http()
        assert _error(http.post("/v1/embeddings", json={"input": "x"}), 503)["code"] == "model_not_ready"
        loaded.set()
        _wait_until(lambda: http.get("/health").status_code == 200, 20, "the server never became ready")
        assert http.post("/v1/embeddings", json={"input": "x"}).json()["model"] == NAME
    finally:
        running.stop()


def test_an_embedder_that_cannot_load_fails_the_server(llm):
    def load_embedder():
        return Embedder("/no/such/encoder")

    running = RunningServer(llm.with_options(kv_cache_bytes=POOL_BYTES), embedder=load_embedder)
    try:
        http = running.http()
        _wait_until(lambda: running.app.state.server.load_error is not None, 20, "the load never failed")
        assert isinstance(running.app.state.server.load_error, ModelLoadError)
        health = http.get("/health")
        assert health.status_code == 503 and "/no/such/encoder" in health.json()["error"]
        assert "/no/such/encoder" in _error(http.post("/v1/embeddings", json={"input": "x"}), 503)["message"]
    finally:
        running.stop()


def test_serve_command_reports_an_embedding_model_that_cannot_load(tmp_path):
    process = _serve("--port", "0", "--embedding-model", str(tmp_path / "no-encoder"), "--threads", "1")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and "no-encoder" in stderr and "not found" in stderr
