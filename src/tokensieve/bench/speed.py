"""`tokensieve bench speed`: prefill and decode tokens/s beside transformers, in the same run."""

from __future__ import annotations

import json
import platform
import time

import torch

from ..config import DTYPES
from ..llm import LLM
from ..sampling_params import SamplingParams
from .hf_baseline import hf_generate_timed, load_hf_model


def _random_prompts(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, length), generator=generator)


def ours_timed(llm: LLM, prompts: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Same measure as hf_generate_timed: (seconds to the first token, seconds for the other steps)."""
    engine = llm.engine
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


def _best(fn, repeats: int) -> tuple[float, float]:
    runs = [fn() for _ in range(repeats)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def run_speed_benchmark(args) -> dict:
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_num_seqs=max(args.batches),
              kv_cache_bytes=args.kv_cache_bytes, native_kernels=args.native_kernels, activations=args.activations)
    hf = load_hf_model(args.model, dtype)
    vocab = llm.engine.model.config.vocab_size
    kernels = "on" if llm.engine.kernels is not None else "off"
    print(f"model {args.model}, {args.dtype}, {args.activations} activations, {torch.get_num_threads()} threads, "
          f"native kernels {kernels}, "
          f"{platform.processor() or platform.machine()}")
    results = {"model": args.model, "dtype": args.dtype, "activations": args.activations, "threads": torch.get_num_threads(), "native_kernels": kernels,
               "prefill": [], "decode": []}
    warm = _random_prompts(1, 64, vocab, 0)
    ours_timed(llm, warm, 4), hf_generate_timed(hf, warm, 4)

    print(f"\n{'prefill tokens':>14} {'ours tok/s':>11} {'HF tok/s':>9} {'ratio':>6}")
    for length in args.prefill_lengths:
        prompts = _random_prompts(1, length, vocab, length)
        ours = _best(lambda: ours_timed(llm, prompts, 1), args.repeats)[0]
        ref = _best(lambda: hf_generate_timed(hf, prompts, 1), args.repeats)[0]
        row = {"tokens": length, "ours_tok_s": length / ours, "hf_tok_s": length / ref, "ratio": ref / ours}
        results["prefill"].append(row)
        print(f"{length:>14} {row['ours_tok_s']:>11.1f} {row['hf_tok_s']:>9.1f} {row['ratio']:>5.2f}x")

    print(f"\n{'batch':>5} {'context':>7} {'ours tok/s':>11} {'HF tok/s':>9} {'vs HF same batch':>17} {'vs HF batch 1':>14}")
    hf_batch1: dict[int, float] = {}
    steps = args.decode_tokens - 1
    for context in args.contexts:
        for batch in sorted(args.batches):
            prompts = _random_prompts(batch, context, vocab, context + batch)
            ours = batch * steps / _best(lambda: ours_timed(llm, prompts, args.decode_tokens), args.repeats)[1]
            ref = batch * steps / _best(lambda: hf_generate_timed(hf, prompts, args.decode_tokens), args.repeats)[1]
            hf_batch1.setdefault(context, ref if batch == 1 else float("nan"))
            row = {"batch": batch, "context": context, "ours_tok_s": ours, "hf_tok_s": ref,
                   "ratio_same_batch": ours / ref, "ratio_vs_hf_batch1": ours / hf_batch1[context]}
            results["decode"].append(row)
            print(f"{batch:>5} {context:>7} {ours:>11.1f} {ref:>9.1f} {row['ratio_same_batch']:>16.2f}x {row['ratio_vs_hf_batch1']:>13.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results
