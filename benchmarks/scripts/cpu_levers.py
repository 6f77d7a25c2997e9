"""What the defaults behind `bench cpu` are worth, on the default model (2 threads, batch 1, greedy,
Spec-Bench text as in bench cpu):

- decode tokens/s with a float32 and a float16 KV cache at 1024 and 3072 tokens of context;
- prefill tokens/s and the process's peak memory with prefill chunks of 512 and 2048 tokens (each
  in a fresh process: a 3072-token prompt and 64 decoded tokens, as bench cpu's peak-memory child);
- where a process's memory goes: peak RSS (anonymous and file-backed) after each stage of a start.

    .venv/bin/python benchmarks/scripts/cpu_levers.py
"""

import statistics
import subprocess
import sys

import torch

STAGES = """
import sys
def memory(stage):
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    mb = lambda name: int(fields[name].split()[0]) // 1024
    print(f"| {stage} | {mb('VmHWM')} | {mb('RssAnon')} | {mb('RssFile')} |")
import torch; memory("import torch")
torch.set_num_threads(2)
from tokensieve.kernels import native_kernels; kernels = native_kernels(); memory("+ kernels")
from tokensieve.weights.loader import load_model, load_tokenizer
model = load_model("smollm2-135m", kernels=kernels); memory("+ model (mapped, untouched)")
tokenizer = load_tokenizer("smollm2-135m"); memory("+ tokenizer")
from tokensieve.config import EngineConfig
from tokensieve.engine.engine import LLMEngine
from tokensieve.sampling_params import SamplingParams
from tokensieve.bench.cpu import context_ids, spec_bench_texts
engine = LLMEngine(model, EngineConfig(prefix_caching=False, max_model_len=4096, prefill_chunk_size=int(sys.argv[1])), tokenizer)
memory("+ engine")
ids = context_ids(lambda text: tokenizer(text, add_special_tokens=False).input_ids, spec_bench_texts(), 3072)
engine.add_request(ids, SamplingParams(max_tokens=65, temperature=0, ignore_eos=True))
engine.step(); memory("+ first prefill chunk")
while engine.scheduler.running and engine.scheduler.running[0].num_processed < len(ids):
    engine.step()
memory("+ the whole prompt (3072 tokens)")
while engine.has_unfinished():
    engine.step()
memory("+ 64 decoded tokens")
"""


def decode_rates(llm, ids, contexts):
    from tokensieve import SamplingParams

    print("| context | float32 KV tok/s | float16 KV tok/s | float16 / float32 |\n|---:|---:|---:|---:|")
    for context in contexts:
        rates = {}
        for kv_dtype in ("float32", "float16"):
            engine = llm.with_options(kv_dtype=kv_dtype)
            params = SamplingParams(max_tokens=65, temperature=0, ignore_eos=True)
            runs = [engine.generate({"prompt_token_ids": ids[:context]}, params)[0].metrics.decode_tokens_per_second
                    for _ in range(3)]
            rates[kv_dtype] = statistics.median(runs)
        print(f"| {context} | {rates['float32']:.1f} | {rates['float16']:.1f} | {rates['float16'] / rates['float32']:.2f}x |")


def chunk_sizes(llm, ids):
    from tokensieve import SamplingParams
    from tokensieve.bench import cpu_processes

    print("\n| prefill chunk | prefill tok/s, 3072 tokens | peak RSS, MB (5 fresh processes) |\n|---:|---:|---|")
    for chunk in (512, 2048):
        engine = llm.with_options(prefill_chunk_size=chunk, max_batched_tokens=2048)
        params = SamplingParams(max_tokens=1, temperature=0)
        rate = statistics.median(3072 / engine.generate({"prompt_token_ids": ids}, params)[0].metrics.time_to_first_token
                                 for _ in range(3))
        child = [sys.executable, "-c", STAGES, str(chunk)]
        peaks = []
        for _ in range(5):
            lines = subprocess.run(child, capture_output=True, text=True, check=True).stdout.splitlines()
            peaks.append(int(lines[-1].split("|")[2]))
        print(f"| {chunk} | {rate:.0f} | {sorted(peaks)} (median {statistics.median(peaks):.0f}) |")


def main() -> None:
    from tokensieve import LLM
    from tokensieve.bench.cpu import context_ids, spec_bench_texts

    torch.set_num_threads(2)
    llm = LLM("smollm2-135m", prefix_caching=False, max_model_len=4096)
    ids = context_ids(lambda text: llm.tokenizer(text, add_special_tokens=False).input_ids, spec_bench_texts(), 3072)
    decode_rates(llm, ids, (1024, 3072))
    chunk_sizes(llm, ids)
    print("\n| stage (prefill chunks of 512) | peak RSS, MB | anonymous | file-backed |\n|---|---:|---:|---:|")
    print(subprocess.run([sys.executable, "-c", STAGES, "512"], capture_output=True, text=True, check=True).stdout, end="")


if __name__ == "__main__":
    main()
