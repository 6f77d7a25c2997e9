"""llama.cpp's side of `bench cpu`, through llama-cpp-python: load a GGUF file, prefill token ids and
decode greedily, timed. This file imports nothing from tokensieve, so that a fresh process can load it
by its path (`CHILD_COMMAND`) and measure llama.cpp's own start and memory, without torch."""

from __future__ import annotations

import json
import resource
import sys
import time

N_BATCH = 512  # llama-cpp-python's default: prompt tokens per llama_decode call
COLD_PROMPT = "Hi"  # the short prompt of the cold-start runs, ours and llama.cpp's
# `python -c CHILD_COMMAND <this file> MODE ...` runs main(MODE ...) without importing the tokensieve package
CHILD_COMMAND = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('cpu_llamacpp', sys.argv[1]); "
                 "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); module.main(sys.argv[2:])")


def load(gguf: str, n_ctx: int, threads: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=gguf, n_ctx=n_ctx, n_batch=N_BATCH, n_threads=threads, n_threads_batch=threads,
                           verbose=False)


def _greedy_token(llm) -> int:
    """The likeliest token after the last evaluated one (llama-cpp-python keeps no logits of its own
    unless logits_all is set: they are read from the llama.cpp context)."""
    import llama_cpp
    import numpy as np

    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    return int(logits.argmax())


def timed_run(llm, ids: list[int], decode_tokens: int) -> tuple[float, float]:
    """From an empty KV cache: (seconds to prefill `ids` and pick the first token, seconds for the
    `decode_tokens` greedy tokens after it)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    token = _greedy_token(llm)
    first = time.perf_counter()
    for _ in range(decode_tokens):
        llm.eval([token])
        token = _greedy_token(llm)
    return first - start, time.perf_counter() - first


def peak_rss_bytes() -> int:
    """This process's peak resident memory (the mapped weight pages it has read included). On Linux it is
    VmHWM, the peak of this program's own memory: ru_maxrss would start from the RSS of the parent that
    forked it, which Linux carries over the exec."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def main(argv: list[str]) -> None:
    """A fresh process's measure. `first-token GGUF N_CTX THREADS`: write the first token of COLD_PROMPT
    and a newline. `peak GGUF N_CTX THREADS DECODE_TOKENS`: prefill the token ids read from stdin (a JSON
    list), decode, and print the peak RSS in bytes."""
    mode, gguf, n_ctx, threads, *rest = argv
    llm = load(gguf, int(n_ctx), int(threads))
    if mode == "first-token":
        text = llm(COLD_PROMPT, max_tokens=1, temperature=0)["choices"][0]["text"]
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    elif mode == "peak":
        timed_run(llm, json.load(sys.stdin), int(rest[0]))
        print(peak_rss_bytes())
    else:
        raise ValueError(f"unknown mode {mode!r}: first-token or peak")
