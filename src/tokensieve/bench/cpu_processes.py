"""The measures of `bench cpu` that need a fresh process per engine: cold start (from starting the
process to the first byte it writes, the first token of a short prompt) and peak memory (the child's
own peak RSS after loading, prefilling the longest context and decoding). Our child for peak memory is
this module (`python -m tokensieve.bench.cpu_processes`); llama.cpp's loads cpu_llamacpp.py by its path,
so that it never imports torch."""

from __future__ import annotations

import json
import select
import statistics
import subprocess
import sys
import tempfile
import time

from ..errors import ConfigError
from . import cpu_llamacpp

CHILD_TIMEOUT_S = 600


def llamacpp_command(mode: str, *args) -> list[str]:
    return [sys.executable, "-c", cpu_llamacpp.CHILD_COMMAND, cpu_llamacpp.__file__, mode, *map(str, args)]


def ours_first_token_command(model: str, threads: int, activations: str | None) -> list[str]:
    """`tokensieve generate` of one token: what a user runs."""
    command = [sys.executable, "-m", "tokensieve.cli", "generate", cpu_llamacpp.COLD_PROMPT, "--model", model,
               "--max-tokens", "1", "--threads", str(threads)]
    return command + (["--activations", activations] if activations else [])


def ours_peak_command(model: str, n_ctx: int, threads: int, decode_tokens: int, activations: str | None) -> list[str]:
    return [sys.executable, "-m", "tokensieve.bench.cpu_processes", model, str(n_ctx), str(threads), str(decode_tokens),
            activations or ""]


def _failed(command: list[str], detail: str) -> ConfigError:
    return ConfigError(f"the benchmark's child process {' '.join(command[:4])} ... failed: {detail.strip()[-2000:]}")


def time_to_first_output(command: list[str]) -> tuple[float, float]:
    """(seconds from starting `command` to the first byte on its stdout, seconds to its exit)."""
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, bufsize=0) as process:
            ready, _, _ = select.select([process.stdout], [], [], CHILD_TIMEOUT_S)
            if not ready:
                process.kill()
                raise _failed(command, f"nothing on its stdout after {CHILD_TIMEOUT_S} s")
            first = process.stdout.read(1)
            first_at = time.perf_counter()
            process.stdout.read()
            process.wait()
            exit_at = time.perf_counter()
        if process.returncode != 0 or not first:
            stderr.seek(0)
            reason = stderr.read().decode(errors="replace") or f"exit code {process.returncode}, nothing on stdout"
            raise _failed(command, reason)
    return first_at - start, exit_at - start


def cold_start(command: list[str], repeats: int) -> dict:
    """Median seconds to the first output and to the exit over `repeats` runs, after one untimed run
    (which puts the weights in the page cache and builds or fills what a first use caches)."""
    time_to_first_output(command)
    runs = [time_to_first_output(command) for _ in range(repeats)]
    first, exits = [r[0] for r in runs], [r[1] for r in runs]
    return {"first_output_s": statistics.median(first), "exit_s": statistics.median(exits),
            "first_output_runs_s": first, "exit_runs_s": exits}


def peak_memory_mb(command: list[str], ids: list[int]) -> float:
    """The peak RSS that the child `command` reports after prefilling `ids` and decoding."""
    try:
        done = subprocess.run(command, input=json.dumps(ids), capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise _failed(command, f"no answer after {CHILD_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise _failed(command, done.stderr or f"exit code {done.returncode}")
    return int(done.stdout.split()[-1]) / 1024**2


def _ours_peak(model: str, n_ctx: int, threads: int, decode_tokens: int, activations: str | None) -> None:
    """Our peak-memory child: the engine as the in-process runs build it, one request of the ids on stdin."""
    import torch

    from ..llm import LLM
    from ..sampling_params import SamplingParams

    torch.set_num_threads(threads)
    ids = json.load(sys.stdin)
    options = {"activations": activations} if activations else {}
    llm = LLM(model, prefix_caching=False, max_model_len=n_ctx, **options)
    llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=decode_tokens + 1, temperature=0, ignore_eos=True))
    print(cpu_llamacpp.peak_rss_bytes())


if __name__ == "__main__":
    model_arg, n_ctx_arg, threads_arg, decode_arg, activations_arg = sys.argv[1:]
    _ours_peak(model_arg, int(n_ctx_arg), int(threads_arg), int(decode_arg), activations_arg or None)
