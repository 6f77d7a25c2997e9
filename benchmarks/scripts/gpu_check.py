"""Fast decoding on a GPU (issue 29), checked and measured in one run: correctness first, then speed.

1. greedy tokens of tiny random Llama, Mistral (sliding window), Qwen2 and Qwen3 models equal transformers'
   in float32, static decode on (CUDA graphs) and off, 1, 3 and 8 prompts at once (bucket padding, and
   batches shrinking as requests finish); in bfloat16 the share of tokens before they part, as a soft figure;
2. KV policies, block selection and speculative decoding give the same greedy tokens on the device as on the CPU;
3. the Triton kernels against the PyTorch code they replace, float32/float16/bfloat16 (skipped off CUDA): paged
   decode attention against its twin (1 to 64 sequences, contexts up to 8k, sliding windows, draft trees,
   block tables read through places), and the layer ops (rms_norm, rotary, silu_mul, store_kv) at the 1B's
   shapes, with the share of elements equal to PyTorch's;
4. the Llama-3.2-1B shape in bfloat16: prefill and decode tokens/s beside transformers, static decode on and
   off, the bandwidth share of each decode step, and a profile of one decode step at batch 1;
5. speculation on that model: the tuner's latency probe at batch 1 (seconds per forward against drafted
   tokens, static decode on and off), and greedy decoding of a repeating text with speculation against
   without (tokens per forward, speedup, the same tokens).

Run from the repository root on the GPU machine, the package imported from the working tree by PYTHONPATH
(no install: that machine has no internet for pip's build backend; torch, transformers and triton are there):

    PYTHONPATH=src python3 benchmarks/scripts/gpu_check.py --out $OUT

and on a CPU, everything shrunk (tiny shapes, few tokens; no Triton), in a minute or two on 2 cores:

    PYTHONPATH=src .venv/bin/python benchmarks/scripts/gpu_check.py --device cpu --quick --out /tmp/gpu_check

`--sections NAME...` runs only some (again after a failure, say). Where the packaged SmolLM2 is not installed
(the GPU machine) the models take a stand-in tokenizer of its vocabulary size: random token ids need no text.

It writes $OUT/gpu_check.json and $OUT/gpu_check.md after every section. A section that fails records its
error and traceback and the next one runs; each stops at its time guard (SIGALRM), keeping what it measured.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import platform
import signal
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from tokensieve.bench.model_shapes import build_shape, ours_from_hf, vocabulary_tokenizer
from tokensieve.bench.provenance import package_version, source_commit
from tokensieve.bench.speed import bandwidth_shares, decode_row, prefill_row, random_prompts, timed_runs
from tokensieve.config import EngineConfig, KVPolicyConfig, KVSelectionConfig, SpeculativeConfig
from tokensieve.engine.engine import LLMEngine
from tokensieve.engine.latency_probe import LatencyProbe
from tokensieve.sampling_params import SamplingParams
from tokensieve.speculative.latency import CONTEXTS, DRAFTED_TOKENS

# the tiny models of tests/test_tiny_architectures.py
TINY = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, vocab_size=49152, initializer_range=0.2, tie_word_embeddings=False,
)
KINDS = ("llama", "mistral", "qwen2", "qwen3")
BATCHES = (1, 3, 8)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # of the output's largest value
# (heads, kv_heads, head_dim, sequences, longest context, window) of each kernel case
KERNEL_CASES = [
    (32, 8, 64, 1, 1, 0), (32, 8, 64, 1, 8192, 0), (32, 8, 64, 7, 1000, 0), (32, 8, 64, 64, 2048, 0),
    (32, 8, 64, 64, 8192, 0), (14, 2, 64, 5, 3000, 0), (16, 8, 128, 3, 4096, 0), (4, 2, 16, 8, 100, 24),
    (32, 8, 64, 16, 5000, 4096),
]


# (tree rows, query heads per KV head, sequences) of each draft-tree case
TREE_CASES = [(4, 4, 3), (17, 4, 5), (64, 4, 32), (128, 8, 2)]


class SectionTimeout(BaseException):
    """Raised by the time guard's alarm (a BaseException, so that no `except Exception` on the way swallows it)."""


# ---- models and generation ---------------------------------------------------------------------

def tiny_hf(kind: str, device: str, dtype: torch.dtype = torch.float32):
    """A tiny random transformers model of `kind` (seed 0), as the tests build it."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    if kind == "llama":
        config = tf.LlamaConfig(**TINY, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        })
    elif kind == "mistral":
        config = tf.MistralConfig(**TINY, sliding_window=24)
    elif kind == "qwen2":
        config = tf.Qwen2Config(**TINY)
    else:
        config = tf.Qwen3Config(**{**TINY, "tie_word_embeddings": True}, head_dim=32)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval().to(device=device, dtype=dtype)


def prompt_ids(count: int, seed: int, first_length: int = 12, step: int = 5) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 49152, (first_length + step * i,), generator=generator).tolist() for i in range(count)]


def engine_tokens(engine: LLMEngine, prompts: list[list[int]], new_tokens: list[int], speculate=None) -> list[list[int]]:
    """Greedy tokens of every prompt, all in the engine at once."""
    ids = [engine.add_request(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, speculate=speculate))
           for p, n in zip(prompts, new_tokens)]
    finals: dict[str, list[int]] = {}
    while len(finals) < len(ids):
        finals |= {out.request_id: out.token_ids for out in engine.step() if out.finished}
    for request_id in ids:
        engine.release(request_id)
    return [finals[request_id] for request_id in ids]


def hf_tokens(hf, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device=hf.device)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def first_difference(ours: list[int], reference: list[int]) -> int | None:
    """The first position where the two differ (a shorter list differs where it ends); None where equal."""
    for position, (a, b) in enumerate(zip(ours, reference)):
        if a != b:
            return position
    return None if len(ours) == len(reference) else min(len(ours), len(reference))


def captured_buckets(engine: LLMEngine) -> list[int] | None:
    """Batch sizes the engine's static decode step has captured CUDA graphs for (None: no such step to ask)."""
    decoder = getattr(engine.runner, "static_decoder", None)
    return None if decoder is None else sorted(getattr(decoder, "graphs", {}))


# ---- 1. greedy tokens against transformers -------------------------------------------------------

def check_greedy_tokens(args, results: dict) -> str:
    tokenizer, results["tokenizer"] = vocabulary_tokenizer()
    new_tokens = 8 if args.quick else 24
    prompts = prompt_ids(max(BATCHES), seed=1)
    lengths = [new_tokens - i for i in range(len(prompts))]  # requests finish one by one: the batch shrinks
    cases, soft = results.setdefault("cases", []), results.setdefault("bfloat16_agreement", [])
    for kind in KINDS:
        hf = tiny_hf(kind, args.device)
        reference = [hf_tokens(hf, p, new_tokens) for p in prompts]
        for static, batches in ((True, BATCHES), (False, BATCHES[-1:])):
            engine = LLMEngine(ours_from_hf(hf), tiny_config(args, "float32", static), tokenizer)
            for batch in batches:
                ours = engine_tokens(engine, prompts[:batch], lengths[:batch])
                parted = [first_difference(o, r[:n]) for o, r, n in zip(ours, reference, lengths)]
                cases.append({"kind": kind, "static_decode": static, "batch": batch, "ok": parted == [None] * batch,
                              "first_difference": parted, "graphs": captured_buckets(engine)})
        hf = hf.to(torch.bfloat16)
        engine = LLMEngine(ours_from_hf(hf), tiny_config(args, "bfloat16", True), tokenizer)
        ours = engine_tokens(engine, prompts, [new_tokens] * len(prompts))
        reference = [hf_tokens(hf, p, new_tokens) for p in prompts]
        parted = [first_difference(o, r) for o, r in zip(ours, reference)]
        total = new_tokens * len(prompts)
        soft.append({"kind": kind, "batch": len(prompts),
                     "share_before_parting": sum(new_tokens if at is None else at for at in parted) / total,
                     "share_equal": sum(a == b for o, r in zip(ours, reference) for a, b in zip(o, r)) / total})
    graphs_missing = args.device.startswith("cuda") and any(c["static_decode"] and c["graphs"] == [] for c in cases)
    results["graphs_missing"] = graphs_missing
    return "passed" if all(c["ok"] for c in cases) and not graphs_missing else "failed"


def tiny_config(args, dtype: str, static_decode: bool | None, **options) -> EngineConfig:
    return EngineConfig(dtype=dtype, device=args.device, kv_cache_bytes=64 * 1024**2, max_num_seqs=8,
                        static_decode=static_decode, **options)


# ---- 2. the same tokens on the device as on the CPU ----------------------------------------------

AGREEMENT_SETTINGS = {  # name -> (engine options, speculate)
    "snapkv@32": (dict(kv_policy=KVPolicyConfig("snapkv", budget=32)), None),
    "h2o@32, every 8 decode steps": (dict(kv_policy=KVPolicyConfig("h2o", budget=32, decode_interval=8)), None),
    "quest selection 0.5": (dict(kv_selection=KVSelectionConfig(ratio=0.5, dense_layers=1)), None),
    # the Jacobi pool drafts every step: random weights repeat nothing that prompt lookup or recycling could draft
    "speculative, 16 nodes": (dict(speculative=SpeculativeConfig(
        drafters=("lookup", "recycling", "lookahead"), max_nodes=16, tune=False)), True),
}


def check_cpu_agreement(args, results: dict) -> str:
    tokenizer, _ = vocabulary_tokenizer()
    hf = tiny_hf("llama", "cpu")
    phrase = prompt_ids(1, seed=5, first_length=16)[0]
    prompts = [phrase * 5, *prompt_ids(2, seed=6, first_length=70, step=9)]  # all longer than the KV budgets
    new_tokens = [16 if args.quick else 32] * len(prompts)
    on_cpu = EngineConfig(native_kernels=False, kv_cache_bytes=64 * 1024**2)
    plain = engine_tokens(LLMEngine(ours_from_hf(hf), on_cpu, tokenizer), prompts, new_tokens)
    cases = results.setdefault("cases", [])
    for name, (options, speculate) in AGREEMENT_SETTINGS.items():
        on_cpu = EngineConfig(native_kernels=False, kv_cache_bytes=64 * 1024**2, **options)
        cpu_tokens = engine_tokens(LLMEngine(ours_from_hf(hf), on_cpu, tokenizer), prompts, new_tokens, speculate)
        engine = LLMEngine(ours_from_hf(hf), tiny_config(args, "float32", None, **options), tokenizer)
        device_tokens = engine_tokens(engine, prompts, new_tokens, speculate)
        parted = [first_difference(d, c) for d, c in zip(device_tokens, cpu_tokens)]
        case = {"setting": name, "ok": parted == [None] * len(prompts), "first_difference": parted}
        if speculate:  # exact verification: the plain greedy tokens, drafted or not
            case["plain_first_difference"] = [first_difference(d, p) for d, p in zip(device_tokens, plain)]
            case["ok"] &= case["plain_first_difference"] == [None] * len(prompts)
            case |= {key: engine.counts[key] for key in ("steps", "spec_draft_tokens", "spec_accepted_tokens")}
        cases.append(case)
    return "passed" if all(c["ok"] for c in cases) else "failed"


# ---- 3. the Triton kernels against PyTorch -------------------------------------------------------

def check_kernels(args, results: dict) -> str:
    if not args.device.startswith("cuda"):
        return "skipped (needs CUDA)"
    from tokensieve.engine.paged_decode import paged_decode_attention, paged_decode_attention_torch

    cases = results.setdefault("cases", [])
    check_layer_ops(args.device, results.setdefault("layer_ops", []))
    for index, (heads, kv_heads, dim, seqs, context, window) in enumerate(KERNEL_CASES):
        for dtype in TOLERANCE:
            index_dtype = torch.int64 if index % 3 == 0 else torch.int32  # the engine's buffers are int32
            case = {"heads": heads, "kv_heads": kv_heads, "dim": dim, "seqs": seqs, "context": context,
                    "window": window, "dtype": str(dtype).removeprefix("torch."), "index_dtype": str(index_dtype)[6:]}
            try:
                inputs = kernel_inputs(heads, kv_heads, dim, seqs, context, dtype, index_dtype, args.device, seed=index)
                scale = dim**-0.5
                expected = paged_decode_attention_torch(*inputs, scale, window).float()
                out = torch.empty_like(inputs[0])
                if index % 2:  # the tables as the static step holds them: more rows than sequences, read by place
                    q, keys, values, tables, lengths = inputs
                    places = torch.randperm(2 * seqs, device=q.device)[:seqs]
                    spread = torch.zeros((2 * seqs, *tables.shape[1:]), dtype=tables.dtype, device=q.device)
                    spread[places] = tables
                    got = paged_decode_attention(q, keys, values, spread, lengths, scale, window, out=out, places=places)
                else:
                    got = paged_decode_attention(*inputs, scale, window, out=out)
                error = (got.float() - expected).abs().max().item() / expected.abs().max().clamp_min(1e-6).item()
                case |= {"relative_error": error, "ok": error <= TOLERANCE[dtype] and got.data_ptr() == out.data_ptr()}
                if (seqs, context) == (64, 8192) or (seqs, context) == (1, 8192):
                    case |= kernel_speed(inputs, scale, window)
            except Exception as exc:  # one case's failure is recorded; the others still run
                case |= {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            cases.append(case)
            torch.cuda.empty_cache()
    for rows, group, seqs in TREE_CASES:  # verification of draft trees: real rows only (padding rows are free)
        for dtype in TOLERANCE:
            case = {"tree_rows": rows, "group": group, "seqs": seqs, "dtype": str(dtype).removeprefix("torch.")}
            try:
                q, keys, values, tables, lengths, visibility, block_rows = tree_inputs(rows, group, seqs, dtype, args.device)
                scale = q.shape[-1] ** -0.5
                tree = dict(block_visibility=visibility, block_rows=block_rows)
                expected = paged_decode_attention_torch(q, keys, values, tables, lengths, scale, **tree).float()
                got = paged_decode_attention(q, keys, values, tables, lengths, scale, **tree).float()
                real = torch.arange(rows, device=q.device) < block_rows.unsqueeze(-1)  # [seqs, rows]
                error = (got - expected)[real].abs().max().item() / expected[real].abs().max().clamp_min(1e-6).item()
                case |= {"relative_error": error, "ok": error <= TOLERANCE[dtype] and bool(torch.isfinite(got).all())}
            except Exception as exc:
                case |= {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            cases.append(case)
    return "passed" if all(c["ok"] for c in cases + results["layer_ops"]) else "failed"


def check_layer_ops(device: str, cases: list) -> None:
    """kernels/triton_ops.py against the PyTorch code it replaces (the model's and the pool's own, with the
    layer ops chosen to be plain PyTorch), at the 1B's shapes (64 rows)."""
    import torch.nn.functional as F

    from tokensieve.engine.kv_pool import KVPool
    from tokensieve.kernels import chosen_layer_ops, triton_ops
    from tokensieve.models.llama import RMSNorm
    from tokensieve.models.rope import RotaryEmbedding, apply_rotary

    generator = torch.Generator(device=device).manual_seed(0)
    for dtype in TOLERANCE:
        def normal(*shape, scale=1.0):
            return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype)

        x, norm = normal(64, 2048, scale=3.0), RMSNorm(2048, 1e-5).to(device=device, dtype=dtype)
        norm.weight.data = normal(2048, scale=0.2) + 1
        qkv, gate_up = normal(64, 48 * 64, scale=2.0), normal(64, 2 * 8192, scale=4.0)
        qk = qkv[:, : 40 * 64].view(64, 40, 64)
        keys, values = qkv[:, 32 * 64 : 40 * 64].view(64, 8, 64), qkv[:, 40 * 64 :].view(64, 8, 64)
        cos, sin = RotaryEmbedding(64, 4096, 500000.0, None).to(device)(torch.arange(0, 4096, 64, device=device), dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        slots = torch.randperm(4096 * 16, generator=generator, device=device)[: 64 * 8].view(64, 8)
        pool = KVPool(4096, 16, 64, dtype, torch.device(device))
        with chosen_layer_ops(None):
            pairs = {"rms_norm": (triton_ops.rms_norm(x, norm.weight, 1e-5), norm(x)),
                     "rotary": (triton_ops.rotary(qk, cos, sin), apply_rotary(qk, cos, sin)),
                     "silu_mul": (triton_ops.silu_mul(gate_up), F.silu(gate) * up)}
            pool.store(slots, keys, values)
        key_pool, value_pool = torch.zeros_like(pool.keys), torch.zeros_like(pool.values)
        triton_ops.store_kv(key_pool, value_pool, slots, keys, values)
        pairs["store_kv"] = (torch.cat([key_pool.view(-1), value_pool.view(-1)]), torch.cat([pool.keys.view(-1), pool.values.view(-1)]))
        for name, (got, expected) in pairs.items():
            got, expected = got.float(), expected.float()
            error = (got - expected).abs().max().item() / expected.abs().max().clamp_min(1e-6).item()
            equal = (got == expected).float().mean().item()
            cases.append({"op": name, "dtype": str(dtype).removeprefix("torch."), "relative_error": error,
                          "share_equal": equal, "ok": error <= TOLERANCE[dtype] and (name != "store_kv" or equal == 1.0)})


def tree_inputs(rows: int, group: int, seqs: int, dtype, device, kv_heads: int = 8, dim: int = 64, context: int = 1500):
    """Sequences whose last block_rows entries are a random draft tree (each node sees itself and its ancestors)."""
    generator = torch.Generator().manual_seed(rows * 100 + seqs)
    block_rows = torch.randint(1, rows + 1, (seqs,), generator=generator)
    block_rows[0] = rows
    q, keys, values, tables, lengths = kernel_inputs(kv_heads * group, kv_heads, dim, seqs, context, dtype, torch.int32,
                                                     device, seed=rows)
    lengths = torch.maximum(lengths, block_rows.to(device).view(-1, 1).to(lengths.dtype))
    visibility = torch.zeros(seqs, rows, rows, dtype=torch.bool)
    for seq in range(seqs):
        for node in range(int(block_rows[seq])):
            parent = int(torch.randint(node, (1,), generator=generator)) if node else None
            visibility[seq, node] = visibility[seq, parent] if parent is not None else False
            visibility[seq, node, node] = True
    q = torch.randn(seqs, rows, kv_heads * group, dim, generator=generator).to(device=device, dtype=dtype)
    return q, keys, values, tables, lengths, visibility.to(device), block_rows.to(device=device, dtype=torch.int32)


def kernel_inputs(heads, kv_heads, dim, seqs, context, dtype, index_dtype, device, seed, block_size=16):
    """q, a shuffled pool holding every (sequence, KV head)'s blocks, block tables and lengths (one at `context`)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    max_blocks = -(-context // block_size)
    lengths = torch.randint(1, context + 1, (seqs, kv_heads), generator=generator, device=device)
    lengths[0, 0] = context
    num_blocks = seqs * kv_heads * max_blocks
    tables = torch.randperm(num_blocks, generator=generator, device=device).view(seqs, kv_heads, max_blocks)
    q = torch.randn(seqs, heads, dim, generator=generator, device=device).to(dtype)
    keys = torch.randn(num_blocks, dim, block_size, generator=generator, device=device).to(dtype)
    values = torch.randn(num_blocks, block_size, dim, generator=generator, device=device).to(dtype)
    return q, keys, values, tables.to(index_dtype), lengths.to(index_dtype)


def kernel_speed(inputs, scale: float, window: int) -> dict:
    """Microseconds per call of the kernel and its twin (CUDA events, median of 20), and the kernel's read rate."""
    from tokensieve.engine.paged_decode import paged_decode_attention, paged_decode_attention_torch

    timings = {}
    for name, function in (("kernel", paged_decode_attention), ("twin", paged_decode_attention_torch)):
        times = []
        for _ in range(23):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function(*inputs, scale, window)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        timings[f"{name}_us"] = sorted(times[3:])[len(times[3:]) // 2]
    q, keys, _, _, lengths = inputs
    read = lengths.sum().item() * keys.shape[1] * 2 * keys.element_size()
    return timings | {"kernel_read_gbs": read / timings["kernel_us"] / 1e3}


# ---- 4. speed of the 1B shape ------------------------------------------------------------------

def measure_speed(args, results: dict) -> str:
    shape = build_shape(args.shape, torch.bfloat16, args.device)
    results |= {"shape": args.shape, "tokenizer": shape.tokenizer_source, "bandwidth_gbs": args.bandwidth_gbs}
    engines = {static: LLMEngine(shape.ours, speed_config(args, static), shape.tokenizer) for static in (True, False)}
    vocab = shape.ours.config.vocab_size
    warm = random_prompts(1, 64, vocab, 0)
    for system in (*engines.values(), shape.hf):
        timed_runs(system, warm, 4, 1)
    quick = args.quick
    tokens, repeats = (8, 1) if quick else (64, 2)
    for length in (64, 128) if quick else (512, 2048):
        results.setdefault("prefill", []).append(prefill_row(engines[True], shape.hf, length, repeats))
    for context in (64, 128) if quick else (512, 2048):
        for batch in (1, 4) if quick else (1, 32):
            row = decode_row(engines[True], shape.hf, batch, context, tokens, repeats)
            prompts = random_prompts(batch, context, vocab, context + batch)
            off = [rest for _, rest in timed_runs(engines[False], prompts, tokens, repeats)]
            row["static_off_tok_s"] = batch * (tokens - 1) / min(off)
            row |= bandwidth_shares(engines[True], row, tokens, args.bandwidth_gbs)
            results.setdefault("decode", []).append(row)
    results["profile_batch_1"] = {f"static {'on' if static else 'off'}": profile_decode_step(engine, vocab)
                                  for static, engine in engines.items()}
    return "measured"


def speed_config(args, static_decode: bool) -> EngineConfig:
    pool = 256 * 1024**2 if args.quick else 6 * 1024**3  # 32 x 2.1k tokens of the 1B shape take 2.2 GB
    return EngineConfig(dtype="bfloat16", device=args.device, max_num_seqs=32, kv_cache_bytes=pool,
                        prefix_caching=False, static_decode=static_decode)


def profile_decode_step(engine: LLMEngine, vocab: int) -> dict:
    """One decode step of one sequence under torch.profiler: device kernels and their busy time against
    the step's wall time, and the CUDA runtime calls the host made (launches, syncs, copies); beside it
    the median of 8 steps unprofiled."""
    prompt = random_prompts(1, 512, vocab, 7)[0].tolist()
    request_id = engine.add_request(prompt, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for _ in range(4):  # the prefill, then decode steps (graphs captured)
        engine.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if engine.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        began = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - began
    steps = []
    for _ in range(8):
        began = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - began)
    engine.abort(request_id)
    events = profile.events()
    on_device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    runtime = collections.Counter(e.name for e in events if e.name.startswith("cuda"))
    return {"profiled_step_ms": wall * 1e3, "step_ms": sorted(steps)[4] * 1e3, "device_ops": len(on_device),
            "device_busy_ms": sum(e.time_range.elapsed_us() for e in on_device) / 1e3,
            "runtime_calls": dict(runtime.most_common(12))}


# ---- 5. speculation on the device -----------------------------------------------------------------

def measure_speculation(args, results: dict) -> str:
    """The tuner's view (the latency probe: seconds per forward by drafted tokens, batch 1, static decode on
    and off), then greedy decoding of a text that repeats itself, with speculation (the device's defaults,
    tuned) against without: tokens per forward, speedup, and whether the tokens are the same."""
    shape = build_shape(args.shape, torch.bfloat16, args.device)
    vocab = shape.ours.config.vocab_size
    results |= {"shape": args.shape, "batch": 1, "drafted_tokens": list(DRAFTED_TOKENS), "contexts": list(CONTEXTS)}
    for static in (True, False):
        engine = LLMEngine(shape.ours, speed_config(args, static), shape.tokenizer)
        probe = LatencyProbe(engine.runner, engine.block_manager, vocab, engine.max_model_len, rounds=1 if args.quick else 5)
        results[f"probe, static decode {'on' if static else 'off'}"] = {
            context: probe(1, list(DRAFTED_TOKENS), context) for context in CONTEXTS}
    prompt = random_prompts(1, 24, vocab, 11)[0].tolist() * 8  # prompt lookup has something to copy
    params = SamplingParams(max_tokens=16 if args.quick else 128, temperature=0, ignore_eos=True)
    runs = {}
    for name, speculative in (("plain", None), ("speculative", SpeculativeConfig())):
        engine = LLMEngine(shape.ours, replace(speed_config(args, None), speculative=speculative), shape.tokenizer)
        engine_tokens(engine, [prompt], [8])  # warm-up: graphs captured, the latency table probed
        steps = engine.counts["steps"]
        began = time.perf_counter()
        tokens = engine_tokens(engine, [prompt], [params.max_tokens])[0]
        runs[name] = {"seconds": time.perf_counter() - began, "forwards": engine.counts["steps"] - steps, "tokens": tokens}
    plain, spec = runs["plain"], runs["speculative"]
    results["speculation"] = {
        "tokens": len(spec["tokens"]), "identical": spec["tokens"] == plain["tokens"],
        "tokens_per_forward": len(spec["tokens"]) / spec["forwards"], "speedup": plain["seconds"] / spec["seconds"],
        "plain_tok_s": len(plain["tokens"]) / plain["seconds"], "speculative_tok_s": len(spec["tokens"]) / spec["seconds"],
    }
    return "passed" if results["speculation"]["identical"] else "failed"


SECTIONS = {  # name -> (function, time guard in seconds on a GPU)
    "greedy_tokens": (check_greedy_tokens, 90),
    "cpu_agreement": (check_cpu_agreement, 60),
    "kernels": (check_kernels, 140),  # a fresh machine compiles each kernel specialization first (about a second each)
    "speed": (measure_speed, 180),
    "speculation": (measure_speculation, 90),
}


# ---- running and reporting -----------------------------------------------------------------------

def run_section(name: str, function, guard_s: float, args, report: dict) -> None:
    entry = report["sections"][name] = {"status": "running", "time_guard_s": guard_s, "results": {}}

    def expire(signum, frame):
        raise SectionTimeout(f"stopped at its time guard of {guard_s:.0f} s")

    began = time.monotonic()
    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, guard_s)
    try:
        entry["status"] = function(args, entry["results"])
    except SectionTimeout as exc:
        entry |= {"status": "timed out", "error": str(exc), "traceback": traceback.format_exc()}
    except Exception as exc:
        entry |= {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        entry["seconds"] = time.monotonic() - began
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"{name}: {entry['status']} in {entry['seconds']:.1f} s", flush=True)
    if "error" in entry:
        print(entry["traceback"], file=sys.stderr, flush=True)


def environment(args) -> dict:
    cuda = torch.cuda.is_available()
    return {
        "command": " ".join(sys.argv), "device": args.device, "quick": args.quick, "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": package_version("transformers"),
        "triton": package_version("triton"), "commit": source_commit(),
        "gpu": torch.cuda.get_device_name() if cuda else None, "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def write_report(report: dict, out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# gpu_check", "", f"`{env['command']}`", "",
             ", ".join(f"{key} {value}" for key, value in env.items() if key != "command"), "",
             "| section | status | seconds |", "|---|---|---:|"]
    lines += [f"| {name} | {entry['status']} | {entry.get('seconds', 0):.1f} |" for name, entry in report["sections"].items()]
    for name, entry in report["sections"].items():
        lines += ["", f"## {name}: {entry['status']}"]
        if "error" in entry:
            lines += ["```", entry["traceback"].strip(), "```", ""]
        for key, value in entry["results"].items():
            lines += table(key, value)
    return "\n".join(lines) + "\n"


def table(key: str, value) -> list[str]:
    """A list of rows as a Markdown table; anything else as one line."""
    if not (isinstance(value, list) and value and all(isinstance(row, dict) for row in value)):
        return [f"- {key}: {cell(value)}"]
    columns = list(dict.fromkeys(column for row in value for column in row if not column.endswith("runs_s")))
    return ["", f"**{key}**", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(cell(row.get(column, "")) for column in columns) + " |" for row in value), ""]


def cell(value) -> str:
    return json.dumps(rounded(value), default=str).replace("|", "/") if isinstance(value, (list, dict)) else str(rounded(value))


def rounded(value):
    """Floats to 4 significant digits, inside lists and dicts too."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, list):
        return [rounded(item) for item in value]
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="everything small: tiny shapes, few tokens (for a CPU)")
    parser.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="the GPU's memory bandwidth (H200: 4800)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args()
    args.shape = "tiny" if args.quick else "llama-3.2-1b"
    if args.quick:
        torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(args), "sections": {}}
    for name in args.sections:
        function, guard_s = SECTIONS[name]
        run_section(name, function, guard_s, args, report)
        write_report(report, out)
    print((out / "gpu_check.md").read_text())


if __name__ == "__main__":
    main()
