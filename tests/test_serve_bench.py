"""`bench serve` without a model: its statistics against hand-computed values, the workloads' structure,
the load generator on a fake streaming server (httpx's MockTransport), the Prometheus parsing, the
server command lines, and the report drawn from a small recorded run (tests/data/bench/serve.json)."""

import asyncio
import json
import shutil
from argparse import Namespace
from pathlib import Path

import pytest

from tokensieve.bench import serve_report as report
from tokensieve.bench.serve_servers import llamacpp_command, parse_prefix_metrics, tokensieve_command
from tokensieve.bench.serve_load import Target, run_clients
from tokensieve.bench.serve_workloads import ClientLoad, Conversation, chat_conversation, conversations, system_prompt
from tokensieve.cli import build_parser, main

RECORDED = Path(__file__).parent / "data" / "bench" / "serve.json"


# statistics


def test_percentile_interpolates_between_ranks_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert report.percentile(values, 0) == 1.0
    assert report.percentile(values, 100) == 4.0
    assert report.percentile(values, 50) == pytest.approx(2.5)
    assert report.percentile(values, 99) == pytest.approx(3.97)  # rank 2.97: 3 + 0.97 * (4 - 3)
    assert report.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        report.percentile([], 50)


def test_latency_stats_mean_median_p99():
    stats = report.latency_stats([0.1, 0.2, 0.3, 1.0])
    assert stats["mean"] == pytest.approx(0.4)
    assert stats["p50"] == pytest.approx(0.25)
    assert stats["p99"] == pytest.approx(0.3 + 0.97 * 0.7)
    assert stats["n"] == 4
    assert report.latency_stats([]) is None


def test_jain_index_against_hand_computed_values():
    assert report.jain_index([5, 5, 5, 5]) == pytest.approx(1.0)
    assert report.jain_index([1, 0, 0, 0]) == pytest.approx(0.25)  # one client of four got everything
    assert report.jain_index([1, 2, 3]) == pytest.approx(36 / 42)  # (1+2+3)^2 / (3 * (1+4+9))
    assert report.jain_index([10, 1, 1, 1]) == pytest.approx(169 / 412)
    assert report.jain_index([]) is None and report.jain_index([0, 0]) is None


def _record(user, start, e2e, tokens, chunk_times, ttft=0.1, ok=True):
    return {"user": user, "start": start, "e2e": e2e, "tokens": tokens, "chunk_times": chunk_times, "ok": ok,
            "ttft": ttft, "tpot": (e2e - ttft) / (tokens - 1) if tokens > 1 else None,
            "itl": [b - a for a, b in zip(chunk_times, chunk_times[1:])], "prompt_tokens": 10}


def test_fairness_counts_tokens_until_the_first_client_is_done():
    records = [
        _record("light", 0.0, 2.0, 4, [0.5, 1.0, 1.5, 2.0]),  # light's last request ends at 2.0: the window
        _record("heavy", 0.0, 4.0, 4, [1.0, 2.0, 3.0, 4.0]),  # half its chunks came by 2.0
        _record("heavy", 0.0, 1.0, 2, [0.5, 1.0]),
    ]
    f = report.fairness(records, ["heavy", "light"])
    assert f["window_s"] == 2.0
    assert f["tokens_in_window"] == {"heavy": pytest.approx(4.0), "light": pytest.approx(4.0)}
    assert f["jain"] == pytest.approx(1.0)


def test_summary_throughput_and_latencies():
    records = [_record("a", 0.0, 1.0, 5, [0.2, 0.4, 0.6, 0.8, 1.0], ttft=0.2),
               _record("a", 0.5, 1.5, 3, [1.0, 1.5, 2.0], ttft=0.5),
               {**_record("a", 0.0, 0, 0, []), "ok": False}]
    s = report.summarize_requests(records, duration=2.0)
    assert (s["requests"], s["completed"], s["failed"], s["output_tokens"]) == (3, 2, 1, 8)
    assert s["request_throughput"] == pytest.approx(1.0) and s["output_token_throughput"] == pytest.approx(4.0)
    assert s["ttft"]["mean"] == pytest.approx(0.35)
    assert s["tpot"]["mean"] == pytest.approx((0.2 + 0.5) / 2)  # (1.0-0.2)/4 and (1.5-0.5)/2
    assert s["itl"]["n"] == 4 + 2


# workloads


def test_system_prompt_is_fixed_and_about_a_thousand_tokens():
    text = system_prompt()
    assert text == system_prompt() and text.count("\n## ") >= 8
    assert 3500 < len(text) < 6000  # English: 4-5 characters a token
    from tokensieve.weights.loader import load_tokenizer

    try:
        tokenizer = load_tokenizer("smollm2-135m")
    except Exception as exc:  # the packaged model is not installed
        pytest.skip(f"no tokenizer: {exc}")
    assert 900 <= len(tokenizer.encode(text)) <= 1100


def test_chat_conversations_share_the_system_prompt_and_carry_the_answers():
    first, second = chat_conversation(0), chat_conversation(1)
    assert first.system == second.system == system_prompt()
    assert len(first.turns) == 2 and len(second.turns) == 3
    assert first.turns[0] != second.turns[0]
    messages = second.messages(2, ["answer one", "answer two"])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[2]["content"] == "answer one" and messages[4]["content"] == "answer two"
    assert messages[-1]["content"] == second.turns[2]
    openers = {chat_conversation(i).turns[0] for i in range(128)}
    assert len(openers) == 128


def test_conversations_have_exactly_the_requested_turns_and_offsets_differ():
    for workload in ("chat", "specbench"):
        convs = conversations(workload, 11)
        assert sum(len(c.turns) for c in convs) == 11
        later = conversations(workload, 11, start=len(convs))
        assert not {c.id for c in convs} & {c.id for c in later}
    spec = conversations("specbench", 13)
    assert len({c.category for c in spec}) == 13 and all(c.system is None for c in spec)
    with pytest.raises(ValueError, match="unknown workload 'x'"):
        conversations("x", 1)


# the load generator on a fake server


def _fake_server(requests_seen, gap=0.01, fail_user=None):
    import httpx

    async def handler(request):
        body = json.loads(request.content)
        requests_seen.append(body)
        if body["user"] == fail_user:
            return httpx.Response(503, json={"error": {"message": "queue full"}})
        words = ["Hello", " there", ",", " friend"]

        async def stream():
            yield b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n\n'
            for word in words:
                await asyncio.sleep(gap)
                yield f'data: {json.dumps({"choices": [{"delta": {"content": word}, "finish_reason": None}]})}\n\n'.encode()
            yield b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n\n'
            usage = {"prompt_tokens": 12, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 8}}
            yield f'data: {json.dumps({"choices": [], "usage": usage})}\n\n'.encode()
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, content=stream(), headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


def test_load_generator_times_a_streamed_multi_turn_conversation():
    seen = []
    target = Target("http://fake", "m", max_tokens=16)
    client = ClientLoad("alice", [Conversation("c", ("first?", "second?"), "sys")], concurrency=1)
    records, duration = asyncio.run(run_clients(target, [client], timeout=30, transport=_fake_server(seen)))
    assert [r.turn for r in records] == [0, 1] and all(r.ok for r in records)
    first = records[0]
    assert first.text == "Hello there, friend" and first.tokens == 5 and first.tokens_from_usage
    assert first.prompt_tokens == 12 and first.cached_tokens == 8 and first.finish_reason == "stop"
    assert len(first.itl) == 3 and all(gap > 0.005 for gap in first.itl)
    assert first.ttft > 0.005 and first.e2e >= first.ttft + sum(first.itl) - 1e-6
    assert first.tpot == pytest.approx((first.e2e - first.ttft) / 4)
    assert duration >= first.e2e
    body = seen[1]
    assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["temperature"] == 0
    assert body["user"] == "alice" and body["max_tokens"] == 16
    assert [m["content"] for m in body["messages"]] == ["sys", "first?", "Hello there, friend", "second?"]


def test_load_generator_keeps_the_concurrency_and_records_failures():
    seen = []
    target = Target("http://fake", "m")
    convs = [Conversation(f"c{i}", ("q",)) for i in range(6)]
    clients = [ClientLoad("a", convs[:4], concurrency=2), ClientLoad("bad", convs[4:], concurrency=1)]
    records, _ = asyncio.run(run_clients(target, clients, timeout=30, transport=_fake_server(seen, fail_user="bad")))
    assert len(records) == 6
    assert sum(r.ok for r in records) == 4
    failed = [r for r in records if not r.ok]
    assert all(r.user == "bad" and r.status == 503 and "queue full" in r.error for r in failed)
    rows = [r.to_json() for r in records]
    assert "text" not in rows[0] and report.summarize_requests(rows, 1.0)["failed"] == 2


def test_poisson_arrivals_send_every_conversation():
    seen = []
    client = ClientLoad("p", [Conversation(f"c{i}", ("q",)) for i in range(5)], concurrency=None, rate=200.0, seed=1)
    records, _ = asyncio.run(run_clients(Target("http://fake", "m"), [client], 30, transport=_fake_server(seen, gap=0)))
    assert len(seen) == 5 and all(r.ok for r in records)
    assert sorted(r.start for r in records) == [r.start for r in sorted(records, key=lambda r: r.start)]


def test_a_run_cut_by_its_timeout_marks_the_unfinished_requests():
    client = ClientLoad("a", [Conversation("c", ("q",))], concurrency=1)
    records, duration = asyncio.run(run_clients(Target("http://fake", "m"), [client], 0.02, transport=_fake_server([], gap=0.05)))
    assert duration < 1 and not records[0].ok and "timeout" in records[0].error


# server plumbing


def test_prefix_counters_from_prometheus_text():
    text = ("# HELP tokensieve:prefix_cache_queries_total Prompt tokens looked up\n"
            "# TYPE tokensieve:prefix_cache_queries_total counter\n"
            'tokensieve:prefix_cache_queries_total{model_name="smollm2-135m"} 1200.0\n'
            'tokensieve:prefix_cache_hits_total{model_name="smollm2-135m"} 900\n'
            "tokensieve:num_requests_running 2\n")
    assert parse_prefix_metrics(text) == (1200.0, 900.0)
    assert parse_prefix_metrics("tokensieve:num_requests_running 2\n") is None


def test_server_command_lines():
    args = Namespace(model="smollm2-135m", dtype="float32", activations="int8", threads=2, device="cpu", max_queue=256)
    command = tokensieve_command(args, 8123, prefix_caching=False, scheduling="fcfs", max_num_seqs=4)
    assert command[1:4] == ["-m", "tokensieve.cli", "serve"]
    joined = " ".join(command)
    for part in ("--port 8123", "--max-num-seqs 4", "--scheduling fcfs", "--activations int8", "--threads 2",
                 "--no-prefix-caching"):
        assert part in joined
    assert "--no-prefix-caching" not in tokensieve_command(args, 1, prefix_caching=True, scheduling="vtc", max_num_seqs=8)
    llama = " ".join(llamacpp_command(Path("/m.gguf"), 9000, 2, 4096))
    assert "-m llama_cpp.server --model /m.gguf" in llama and "--n_threads 2" in llama
    assert "--interrupt_requests False" in llama


def test_parser_defaults():
    args = build_parser().parse_args(["bench", "serve"])
    assert args.concurrency == [1, 8, 32] and args.workload == "chat" and args.out == "benchmarks/serve"
    assert args.threads == 2 and args.request_rate is None and set(args.runs) == {"scaling", "prefix", "fairness", "llamacpp"}
    poisson = build_parser().parse_args(["bench", "serve", "--request-rate", "0.5", "2", "--workload", "specbench"])
    assert poisson.request_rate == [0.5, 2.0]


# the report, from a small recorded run


def test_report_from_a_recorded_run_writes_table_and_plot(tmp_path, capsys):
    shutil.copy(RECORDED, tmp_path / "serve.json")
    assert main(["bench", "report", str(tmp_path)]) == 0
    result = json.loads(RECORDED.read_text())
    png = (tmp_path / "serve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (tmp_path / "serve.md").read_text()
    assert result["command"] in table and result["machine"] in table
    for run in result["runs"]:
        assert f"| {run['name']} | {run['system']} |" in table
    assert "mean TTFT off / on" in table and "concurrency 8 / concurrency 1" in table
    assert str(tmp_path / "serve.png") in capsys.readouterr().out


def test_ratios_of_the_recorded_run_are_consistent():
    result = json.loads(RECORDED.read_text())
    r = report.ratios(result)
    assert set(r) >= {"prefix_ttft_off_over_on", "c8_over_c1_token_throughput", "tokensieve_over_llamacpp_token_throughput",
                      "light_ttft_p99_flood_over_alone_vtc", "light_ttft_p99_flood_over_alone_fcfs"}
    for run in result["runs"]:
        s = run["summary"]
        assert s["completed"] <= s["requests"]
        if s["completed"]:
            assert s["ttft"]["p50"] <= s["ttft"]["p99"]


# the whole runner against a fake server on a thread (--url mode)


@pytest.fixture
def fake_http_server():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    counters = {"prefix_cache_queries": 0, "prefix_cache_hits": 0, "activations": "int8"}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _json(self, payload):
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v1/models":
                self._json({"data": [{"id": "fake-model"}]})
            elif self.path == "/stats":
                self._json(counters)
            else:
                self._json({})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            assert body["model"] == "fake-model"
            counters["prefix_cache_queries"] += 10
            counters["prefix_cache_hits"] += 4
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("connection", "close")
            self.end_headers()
            for word in ["a", " b", " c"]:
                self.wfile.write(f'data: {json.dumps({"choices": [{"delta": {"content": word}}]})}\n\n'.encode())
                self.wfile.flush()
            usage = {"prompt_tokens": 7, "completion_tokens": 3}
            self.wfile.write(f'data: {json.dumps({"choices": [], "usage": usage})}\n\ndata: [DONE]\n\n'.encode())
            self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_bench_serve_against_a_running_server_writes_every_file(tmp_path, fake_http_server, capsys):
    code = main(["bench", "serve", "--url", fake_http_server, "--requests", "5", "--concurrency", "1", "8",
                 "--workload", "specbench", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "serve.json").read_text())
    assert [r["name"] for r in result["runs"]] == ["specbench c1", "specbench c8"]
    assert all(r["summary"]["completed"] == 5 and r["summary"]["output_tokens"] == 15 for r in result["runs"])
    assert result["runs"][0]["prefix_cache"] == {"queries": 50, "hits": 20, "hit_rate": 0.4}
    assert result["skipped"] and "need servers this benchmark starts itself" in result["skipped"][0]
    assert len((tmp_path / "serve_cases.jsonl").read_text().splitlines()) == 10
    assert (tmp_path / "serve.png").read_bytes()[:4] == b"\x89PNG"
    assert "| specbench c8 |" in (tmp_path / "serve.md").read_text()
    assert "concurrency 8 / concurrency 1" in capsys.readouterr().out


def test_request_body_greedy_streamed_with_usage_and_server_extras():
    body = Target("http://x", "m", max_tokens=32, extra_body={"repeat_penalty": 1.0}).body([{"role": "user", "content": "q"}], "u")
    assert body["temperature"] == 0 and body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["repeat_penalty"] == 1.0 and body["user"] == "u" and "ignore_eos" not in body


def test_the_activations_a_server_runs_come_from_its_stats(fake_http_server):
    from tokensieve.bench.serve_servers import served_activations

    assert served_activations(fake_http_server, None, "auto") == "int8"
    assert served_activations("http://127.0.0.1:9", None, "auto") == "auto"  # nothing there: what was asked
