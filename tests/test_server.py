"""The HTTP server over the real model, through the official openai client: shapes, streaming, logprobs,
errors, queue limits, disconnects, and no KV block left behind after any of them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from tokensieve.server import create_app
from tokensieve.server.admission import check_admission
from tokensieve.server.app import INDEX_HTML
from tokensieve.server.protocol import APIError

MODEL = "smollm2-135m"
POOL_BYTES = 256 * 1024**2
CHAT = [{"role": "user", "content": "Name one colour."}]
TIMEOUT = 60.0


class RunningServer:
    """A uvicorn server in a thread of its own, on a free port of 127.0.0.1."""

    def __init__(self, llm, load=None, **app_options):
        self.llm = llm
        self.app = create_app(load or llm, served_model_name=MODEL, **app_options)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        _wait_until(lambda: self.server.started, 30, "the server did not start")

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=TIMEOUT)

    def http(self, **headers) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=TIMEOUT, headers=headers)

    def assert_idle(self) -> None:
        """Once no request is in flight, the pool holds no blocks but free cached ones."""
        engine = self.llm.engine
        _wait_until(lambda: engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished(), 20,
                    f"{engine.block_manager.num_used_blocks} KV blocks still used")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _wait_until(condition, seconds: float, message: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


_servers: list[RunningServer] = []


def _start(llm, **app_options) -> RunningServer:
    running = RunningServer(llm, **app_options)
    _servers.append(running)
    return running


@pytest.fixture(scope="module")
def server(llm):
    running = _start(llm.with_options(kv_cache_bytes=POOL_BYTES))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keyed_server(llm):
    running = _start(llm.with_options(kv_cache_bytes=POOL_BYTES), api_key="sesame")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def small_queue_server(llm):
    running = _start(llm.with_options(kv_cache_bytes=POOL_BYTES, max_num_seqs=1), max_queue=2)
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def no_blocks_left():
    yield
    for running in _servers:
        running.assert_idle()


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---- answers -------------------------------------------------------------------------------------

def test_chat_completion_and_usage(server):
    reply = server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    prompt_tokens = server.http().post("/tokenize", json={"messages": CHAT}).json()["count"]
    usage = reply.usage
    assert usage.prompt_tokens == prompt_tokens and 1 <= usage.completion_tokens <= 6
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 <= usage.prompt_tokens_details.cached_tokens < prompt_tokens


def test_streamed_chat_matches_plain_and_ends_with_usage(server):
    client = server.client()
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_plain_and_streamed(server):
    client = server.client()
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert plain.object == "text_completion" and plain.choices[0].text and plain.usage.completion_tokens <= 5
    streamed = list(client.completions.create(model=MODEL, prompt=["The capital of France is"], max_tokens=5,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    token_ids = server.http().post("/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
    from_ids = client.completions.create(model=MODEL, prompt=token_ids, max_tokens=5, temperature=0)
    assert from_ids.choices[0].text == plain.choices[0].text


def test_stop_string_ends_the_text_before_it(server):
    reply = server.client().completions.create(
        model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0, stop=[" 7"],
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and "7" not in choice.text and choice.text.startswith(" 6")


def test_same_seed_same_text(server):
    client = server.client()

    def sample(seed):
        return client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, seed=seed)

    assert sample(7).choices[0].message.content == sample(7).choices[0].message.content


def test_n_choices(server):
    reply = server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, n=3, seed=1)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    assert 3 <= reply.usage.completion_tokens <= 12


def test_chat_logprobs(server):
    reply = server.client().chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy: the likeliest token was chosen
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes).decode() == entry.token
    assert "".join(e.token for e in content).startswith(reply.choices[0].message.content)


def test_completion_logprobs_streamed_and_plain(server):
    client = server.client()
    plain = client.completions.create(model=MODEL, prompt="Once upon a", max_tokens=4, temperature=0, logprobs=2)
    logprobs = plain.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == plain.usage.completion_tokens
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    streamed = list(client.completions.create(model=MODEL, prompt="Once upon a", max_tokens=4, temperature=0,
                                              logprobs=2, stream=True))
    assert [t for c in streamed for t in c.choices[0].logprobs.tokens] == logprobs.tokens
    assert [o for c in streamed for o in c.choices[0].logprobs.text_offset] == logprobs.text_offset


def test_32_concurrent_clients(server):
    client = server.client()

    def ask(i):
        return client.completions.create(model=MODEL, prompt=f"Item {i}:", max_tokens=8, temperature=0, user=f"u{i % 4}")

    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(ask, range(32), timeout=180))
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    assert all(1 <= r.usage.completion_tokens <= 8 for r in replies)


# ---- clients that leave ----------------------------------------------------------------------------

def test_streaming_client_disconnect_frees_its_blocks(server):
    body = {"messages": CHAT, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    server.assert_idle()  # within a bound far shorter than the 3000 tokens would take


def test_waiting_client_disconnect_frees_its_blocks(server):
    body = {"messages": CHAT, "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=server.url, timeout=1.0) as http:
        http.post("/v1/chat/completions", json=body)
    server.assert_idle()


def test_an_engine_failure_mid_stream_is_an_error_line(server, monkeypatch):
    engine, failing = server.llm.engine, threading.Event()
    real_step = engine.step

    def step():
        if failing.is_set():
            failing.clear()
            raise RuntimeError("the forward broke")
        return real_step()

    monkeypatch.setattr(engine, "step", step)
    body = {"messages": CHAT, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: {")
        failing.set()
        rest = [line for line in lines if line]
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "the forward broke" in error["message"] and rest[-1] == "data: [DONE]"
    reply = server.client().completions.create(model=MODEL, prompt="Hi", max_tokens=2)  # the server serves on
    assert reply.choices[0].finish_reason in ("stop", "length")


# ---- errors ------------------------------------------------------------------------------------------

def test_malformed_json(server):
    response = server.http().post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    error = _error(response, 400)
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]


@pytest.mark.parametrize("field, value, words", [
    ("temperature", "hot", "valid number"),
    ("max_tokens", 2.5, "valid integer"),
    ("top_p", 2, "top_p must be in (0, 1]"),
    ("n", 0, "greater than or equal to 1"),
    ("stop", [1], "valid string"),
    ("top_logprobs", 2, "needs logprobs"),
])
def test_bad_values_name_their_parameter(server, field, value, words):
    error = _error(server.http().post("/v1/chat/completions", json={"messages": CHAT, field: value}), 400)
    assert error["param"].split("[")[0] == field and words in error["message"]


def test_bad_message_names_its_path(server):
    error = _error(server.http().post("/v1/chat/completions", json={"messages": [{"role": "user", "content": 3}]}), 400)
    assert error["param"] == "messages[0].content" and error["message"].startswith("messages[0].content must be a string")


def test_unknown_and_unsupported_fields_are_refused(server):
    http = server.http()
    error = _error(http.post("/v1/chat/completions", json={"messages": CHAT, "temprature": 0.5}), 400)
    assert error["param"] == "temprature" and error["message"] == "unknown parameter 'temprature'"
    error = _error(http.post("/v1/chat/completions", json={"messages": CHAT, "tools": [{"type": "function"}]}), 400)
    assert error["param"] == "tools" and "not supported" in error["message"]
    error = _error(http.post("/v1/completions", json={"prompt": "x", "echo": True}), 400)
    assert error["param"] == "echo"
    neutral = {"messages": CHAT, "max_tokens": 1, "presence_penalty": 0, "tools": None, "logit_bias": {}}
    assert http.post("/v1/chat/completions", json=neutral).status_code == 200
    nulls = {"messages": CHAT, "max_tokens": 1, "temperature": None, "n": None, "top_p": None, "stream": None}
    assert http.post("/v1/chat/completions", json=nulls).status_code == 200  # null asks for the default


def test_unknown_model(server):
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().chat.completions.create(model="gpt-5", messages=CHAT, max_tokens=1)
    assert caught.value.code == "model_not_found" and "gpt-5" in caught.value.message


def test_context_length_names_both_numbers(server):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model=MODEL, prompt="Hello", max_tokens=100_000)
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length is 8192 tokens" in caught.value.message and "100001" in caught.value.message


def test_api_key(keyed_server):
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client("wrong").models.list()
    assert _error(keyed_server.http().get("/v1/models"), 401)["code"] == "invalid_api_key"
    broken = keyed_server.http().post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert _error(broken, 401)["code"] == "invalid_api_key"  # the key is checked before the body is read
    assert keyed_server.http().get("/health").status_code == 200
    reply = keyed_server.client("sesame").chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert reply.choices[0].message.content is not None


def test_queue_limits(small_queue_server):
    """One request runs (max_num_seqs=1); the queue holds 2: alice's second and bob's first. Then alice is
    over her share (429) and carol finds the queue full (503); both come with Retry-After."""
    client = small_queue_server.client()

    def stream(user):
        return client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=300, user=user,
                                              extra_body={"ignore_eos": True}, stream=True)

    running = stream("alice")
    next(iter(running))
    streams = [running, stream("alice"), stream("bob")]
    try:
        with pytest.raises(openai.RateLimitError) as over_share:
            stream("alice")
        assert over_share.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.InternalServerError) as full:
            stream("carol")
        assert full.value.status_code == 503 and full.value.response.headers["retry-after"] == "1"
        assert "queue is full" in full.value.message
    finally:
        for s in streams:
            s.close()


def test_admission_rules():
    check_admission({"a": 1}, "a", max_queue=4)  # one client alone may fill the queue
    with pytest.raises(APIError) as caught:
        check_admission({"a": 2, "b": 1}, "a", max_queue=4)
    assert caught.value.status == 429
    check_admission({"a": 2, "b": 1}, "c", max_queue=4)
    with pytest.raises(APIError) as caught:
        check_admission({"a": 3, "b": 1}, "b", max_queue=4)
    assert caught.value.status == 503


# ---- the other routes ----------------------------------------------------------------------------

def test_tokenize_detokenize_models(server):
    http = server.http()
    tokens = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 8192
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world"}
    assert _error(http.post("/detokenize", json={"tokens": [10**9]}), 400)["param"] == "tokens"
    assert _error(http.post("/tokenize", json={}), 400)["message"] == "give exactly one of prompt or messages"
    assert [m.id for m in server.client().models.list()] == [MODEL]


def test_health_metrics_stats_page(server):
    http = server.http()
    assert http.get("/health").json() == {"status": "ok"}
    server.client().completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    metrics = http.get("/metrics").text
    for name in ("num_requests_running", "kv_cache_usage_perc", "prefix_cache_hits_total", "generation_tokens_total",
                 "num_preemptions_total", "spec_decode_num_accepted_tokens_total", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_count", "e2e_request_latency_seconds_sum", "request_queue_time_seconds_count"):
        assert f"tokensieve:{name}" in metrics
    stats = http.get("/stats").json()
    assert stats["ready"] and stats["generation_tokens"] >= 2 and stats["generation_tokens_per_second"] >= 0
    page = http.get("/")
    if INDEX_HTML.is_file():
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    else:
        assert _error(page, 404)["type"] == "not_found_error"
    assert _error(http.get("/v2/nothing"), 404)["type"] == "not_found_error"


def test_health_is_503_while_loading(llm):
    loaded = threading.Event()
    engine_llm = llm.with_options(kv_cache_bytes=POOL_BYTES)

    def load():
        loaded.wait(30)
        return engine_llm

    running = RunningServer(engine_llm, load=load)
    try:
        http = running.http()
        assert http.get("/health").status_code == 503
        assert _error(http.post("/v1/completions", json={"prompt": "x"}), 503)["code"] == "model_not_ready"
        loaded.set()
        _wait_until(lambda: http.get("/health").status_code == 200, 20, "the server never became ready")
    finally:
        running.stop()


# ---- the command -------------------------------------------------------------------------------------

def _serve(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tokensieve.cli", "serve", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_serve_command_answers_once_loaded():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = _serve("--port", str(port), "--served-model-name", "tiny", "--threads", "1")
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

        def ready():
            assert process.poll() is None, process.stderr.read()
            try:
                return http.get("/health").status_code == 200
            except httpx.TransportError:
                return False

        _wait_until(ready, 120, "tokensieve serve never became ready")
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny"]
    finally:
        process.terminate()
        process.wait(30)


def test_serve_command_reports_a_model_that_cannot_load(tmp_path):
    process = _serve("--port", "0", "--model", str(tmp_path / "missing.gguf"))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and "missing.gguf" in stderr
