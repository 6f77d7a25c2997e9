"""The servers `bench serve` talks to: `tokensieve serve` and llama-cpp-python's server as subprocesses
on free ports of 127.0.0.1, and what the benchmark reads from them (the served model's name, the prefix
cache's counters)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server started as a subprocess, waited for until `ready_path` answers 200, stopped on exit."""

    def __init__(self, name: str, command: list[str], port: int, ready_path: str, startup_timeout: float):
        self.name, self.command, self.port = name, command, port
        self.ready_path, self.startup_timeout = ready_path, startup_timeout
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-serve-{name}-", suffix=".log", delete=False)
        self.process: subprocess.Popen | None = None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> ServerProcess:
        import httpx

        print(f"starting {self.name}: {' '.join(self.command)}", flush=True)
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        started = time.perf_counter()
        while time.perf_counter() - started < self.startup_timeout:
            if self.process.poll() is not None:
                raise ConfigError(f"{self.name} exited with code {self.process.returncode} before it was ready; "
                                  f"its log ({self.log.name}) ends with:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + self.ready_path, timeout=5).status_code == 200:
                    print(f"{self.name} ready in {time.perf_counter() - started:.1f} s", flush=True)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise ConfigError(f"{self.name} was not ready after {self.startup_timeout:.0f} s; its log ({self.log.name}) "
                          f"ends with:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def tokensieve_command(args, port: int, *, prefix_caching: bool, scheduling: str, max_num_seqs: int) -> list[str]:
    command = [sys.executable, "-m", "tokensieve.cli", "serve", "--port", str(port), "--model", args.model,
               "--dtype", args.dtype, "--activations", args.activations, "--threads", str(args.threads),
               "--max-num-seqs", str(max_num_seqs), "--max-queue", str(args.max_queue), "--scheduling", scheduling]
    if args.device != "cpu":
        command += ["--device", args.device]
    return command + ([] if prefix_caching else ["--no-prefix-caching"])


def llamacpp_command(gguf: Path, port: int, threads: int, n_ctx: int) -> list[str]:
    # interrupt_requests off: by default llama-cpp-python ends a stream early when another request waits
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx),
            "--interrupt_requests", "False"]


def served_model(base_url: str, api_key: str | None, fallback: str) -> str:
    """The first model the server lists at /v1/models (the name requests must carry)."""
    import httpx

    try:
        response = httpx.get(base_url + "/v1/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {}, timeout=10)
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        return fallback


def served_activations(base_url: str, api_key: str | None, fallback: str) -> str:
    """What a tokensieve server's engine runs ("int8" or "float32", its /stats), or `fallback`."""
    import httpx

    try:
        response = httpx.get(base_url + "/stats", headers={"Authorization": f"Bearer {api_key}"} if api_key else {}, timeout=10)
        return response.json()["activations"]
    except (httpx.HTTPError, ValueError, KeyError):
        return fallback


def prefix_counters(base_url: str, api_key: str | None) -> tuple[float, float] | None:
    """(prefix_cache_queries, prefix_cache_hits) from /stats, or from /metrics; None where the server
    has neither."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(base_url + "/stats", headers=headers, timeout=10)
        if response.status_code == 200:
            stats = response.json()
            return float(stats["prefix_cache_queries"]), float(stats["prefix_cache_hits"])
    except (httpx.HTTPError, ValueError, KeyError):
        pass
    try:
        response = httpx.get(base_url + "/metrics", headers=headers, timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return parse_prefix_metrics(response.text)


def parse_prefix_metrics(text: str) -> tuple[float, float] | None:
    """The prefix cache's query and hit totals from Prometheus text (summed over label sets)."""
    totals = {"queries": 0.0, "hits": 0.0}
    seen = set()
    for line in text.splitlines():
        match = re.match(r"^tokensieve:prefix_cache_(queries|hits)_total(?:\{[^}]*\})?\s+([0-9.eE+-]+)", line)
        if match:
            totals[match.group(1)] += float(match.group(2))
            seen.add(match.group(1))
    return (totals["queries"], totals["hits"]) if seen == {"queries", "hits"} else None
