"""`tokensieve bench speed`: prefill and decode tokens/s beside transformers, in the same run; on CUDA also
the share of the GPU's memory bandwidth that a decode step's reads take at the speed measured."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..config import DTYPES, EngineConfig
from ..engine.engine import LLMEngine
from ..llm import LLM
from ..sampling_params import SamplingParams
from .hf_baseline import hf_generate_timed, load_hf_model
from .model_shapes import build_shape, model_weight_bytes
from .plotting import require_matplotlib
from .provenance import engine_settings, run_info
from .report import write_report
from .speed_report import decode_line, prefill_line

STATIC_DECODE = {"auto": None, "on": True, "off": False}  # --static-decode -> EngineConfig.static_decode


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, length), generator=generator)


def ours_timed(system: LLM | LLMEngine, prompts: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Same measure as hf_generate_timed: (seconds to the first token, seconds for the other steps). Each
    step hands back host lists, so the clock reads are synchronous with the device."""
    engine = system.engine if isinstance(system, LLM) else system
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    ids = [engine.add_request(row.tolist(), params) for row in prompts]
    first_token_at, last_token_at, started, done = None, None, set(), set()
    while len(done) < len(ids):
        outputs = engine.step()
        now = time.perf_counter()
        started.update(o.request_id for o in outputs)
        if first_token_at is None and len(started) == len(ids):
            first_token_at = now
        last_token_at = now
        done.update(o.request_id for o in outputs if o.finished)
    for request_id in ids:
        engine.release(request_id)
    return first_token_at - start, last_token_at - first_token_at


def timed_runs(system, prompts: torch.Tensor, new_tokens: int, repeats: int) -> list[tuple[float, float]]:
    """`repeats` greedy runs of our engine or a transformers model, each timed as ours_timed."""
    run = ours_timed if isinstance(system, (LLM, LLMEngine)) else hf_generate_timed
    return [run(system, prompts, new_tokens) for _ in range(repeats)]


def prefill_row(engine: LLMEngine, hf, length: int, repeats: int) -> dict:
    """Best of the repeats: the first token's time is the prefill."""
    prompts = random_prompts(1, length, engine.model.config.vocab_size, length)
    ours = [first for first, _ in timed_runs(engine, prompts, 1, repeats)]
    ref = [first for first, _ in timed_runs(hf, prompts, 1, repeats)]
    return {"tokens": length, "ours_tok_s": length / min(ours), "hf_tok_s": length / min(ref),
            "ratio": min(ref) / min(ours), "ours_runs_s": ours, "hf_runs_s": ref}


def decode_row(engine: LLMEngine, hf, batch: int, context: int, decode_tokens: int, repeats: int) -> dict:
    """Decode tokens/s of `batch` prompts of `context` tokens, counting the steps after the first token."""
    prompts = random_prompts(batch, context, engine.model.config.vocab_size, context + batch)
    ours = [rest for _, rest in timed_runs(engine, prompts, decode_tokens, repeats)]
    ref = [rest for _, rest in timed_runs(hf, prompts, decode_tokens, repeats)]
    ours_rate, hf_rate = batch * (decode_tokens - 1) / min(ours), batch * (decode_tokens - 1) / min(ref)
    return {"batch": batch, "context": context, "ours_tok_s": ours_rate, "hf_tok_s": hf_rate,
            "ratio_same_batch": ours_rate / hf_rate, "ours_runs_s": ours, "hf_runs_s": ref}


def step_read_bytes(engine: LLMEngine, batch: int, context: float) -> tuple[int, float]:
    """Bytes a decode step must read: the weights (each tensor once), and the KV entries of `batch`
    sequences of `context` tokens."""
    cfg = engine.model.config
    kv = batch * context * cfg.num_layers * cfg.num_kv_heads * engine.pool.bytes_per_entry
    return model_weight_bytes(engine.model), kv


def bandwidth_shares(engine: LLMEngine, row: dict, decode_tokens: int, bandwidth_gbs: float) -> dict:
    """Share of `bandwidth_gbs` that reading the weights (and the weights and KV entries) once per decode
    step takes at the row's speed, ours and transformers'."""
    weights, kv = step_read_bytes(engine, row["batch"], row["context"] + decode_tokens / 2)
    shares = {}
    for system in ("ours", "hf"):
        steps_per_s = row[f"{system}_tok_s"] / row["batch"]
        shares[f"{system}_weights_bandwidth"] = weights * steps_per_s / (bandwidth_gbs * 1e9)
        shares[f"{system}_weights_kv_bandwidth"] = (weights + kv) * steps_per_s / (bandwidth_gbs * 1e9)
    return shares


def load_systems(args, config: EngineConfig) -> tuple[LLMEngine, torch.nn.Module]:
    """Our engine and transformers' model on the same weights: a model file's, or random ones of --shape."""
    if args.shape is None:
        return LLMEngine(args.model, config), load_hf_model(args.model, DTYPES[args.dtype], args.device)
    shape = build_shape(args.shape, DTYPES[args.dtype], args.device)
    return LLMEngine(shape.ours, config, shape.tokenizer), shape.hf


def run_speed_benchmark(args) -> dict:
    require_matplotlib()
    torch.set_num_threads(args.threads)
    info = run_info(args)  # before the run: the commit and machine that ran it
    # no prefix caching: each setting runs the same prompts `repeats` times, and every run must compute them
    config = EngineConfig(
        dtype=args.dtype, device=args.device, max_num_seqs=max(args.batches), kv_cache_bytes=args.kv_cache_bytes,
        native_kernels=args.native_kernels, activations=args.activations, kv_dtype=args.kv_dtype,
        prefix_caching=False, static_decode=STATIC_DECODE[args.static_decode],
    )
    engine, hf = load_systems(args, config)
    on_cuda = engine.device.type == "cuda"
    if args.shape is not None:
        info["model"] = f"{args.shape} shape, random weights"
    if on_cuda:
        info["machine"] = f"{torch.cuda.get_device_name(engine.device)}; host {info['machine']}"
    info |= engine_settings(engine)
    result = info | {
        "device": args.device, "static_decode": args.static_decode, "native_kernels": engine.kernels is not None,
        "decode_tokens": args.decode_tokens, "repeats": args.repeats, "prefill": [], "decode": [],
    }
    if on_cuda:
        result |= {"bandwidth_gbs": args.bandwidth_gbs, "weight_bytes": model_weight_bytes(engine.model)}
    print(f"{result['model']}, {result['dtype']}, {result['activations']} activations, {result['threads']} threads, "
          f"native kernels {'on' if result['native_kernels'] else 'off'}, static decode {args.static_decode}, "
          f"{result['machine']}")
    warm = random_prompts(1, 64, engine.model.config.vocab_size, 0)
    ours_timed(engine, warm, 4), hf_generate_timed(hf, warm, 4)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "speed_cases.jsonl", "w") as cases:  # each setting as soon as it is measured

        def record(kind: str, row: dict, line: str) -> None:
            result[kind].append(row)
            cases.write(json.dumps({"kind": kind, **row}) + "\n")
            cases.flush()
            print(line, flush=True)

        for length in args.prefill_lengths:
            row = prefill_row(engine, hf, length, args.repeats)
            record("prefill", row, prefill_line(row))
        for context in args.contexts:
            hf_batch1 = None
            for batch in sorted(args.batches):
                row = decode_row(engine, hf, batch, context, args.decode_tokens, args.repeats)
                hf_batch1 = row["hf_tok_s"] if batch == 1 else hf_batch1
                row["ratio_vs_hf_batch1"] = row["ours_tok_s"] / hf_batch1 if hf_batch1 else None
                if on_cuda:
                    row |= bandwidth_shares(engine, row, args.decode_tokens, args.bandwidth_gbs)
                record("decode", row, decode_line(row))
    write_report("speed", result, out)
    print((out / "speed.md").read_text())
    return result
