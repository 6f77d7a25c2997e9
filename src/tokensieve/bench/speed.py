"""`tokensieve bench speed`: prefill and decode tokens/s beside transformers, in the same run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..config import DTYPES
from ..llm import LLM
from ..sampling_params import SamplingParams
from .hf_baseline import hf_generate_timed, load_hf_model
from .plotting import require_matplotlib
from .provenance import engine_settings, run_info
from .report import write_report
from .speed_report import decode_line, prefill_line


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


def run_speed_benchmark(args) -> dict:
    require_matplotlib()
    torch.set_num_threads(args.threads)
    info = run_info(args)  # before the run: the commit and machine that ran it
    # no prefix caching: each setting runs the same prompts `repeats` times, and every run must compute them
    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_num_seqs=max(args.batches),
              kv_cache_bytes=args.kv_cache_bytes, native_kernels=args.native_kernels, activations=args.activations,
              kv_dtype=args.kv_dtype, prefix_caching=False)
    info |= engine_settings(llm.engine)
    hf = load_hf_model(args.model, DTYPES[args.dtype])
    vocab = llm.engine.model.config.vocab_size
    result = info | {
        "native_kernels": llm.engine.kernels is not None, "decode_tokens": args.decode_tokens, "repeats": args.repeats,
        "prefill": [], "decode": [],
    }
    print(f"{result['model']}, {result['dtype']}, {result['activations']} activations, {result['threads']} threads, "
          f"native kernels {'on' if result['native_kernels'] else 'off'}, {result['machine']}")
    warm = _random_prompts(1, 64, vocab, 0)
    ours_timed(llm, warm, 4), hf_generate_timed(hf, warm, 4)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "speed_cases.jsonl", "w") as cases:  # each setting as soon as it is measured

        def record(kind: str, row: dict, line: str) -> None:
            result[kind].append(row)
            cases.write(json.dumps({"kind": kind, **row}) + "\n")
            cases.flush()
            print(line, flush=True)

        for length in args.prefill_lengths:  # best of the repeats: the first token's time is the prefill
            prompts = _random_prompts(1, length, vocab, length)
            ours = [ours_timed(llm, prompts, 1)[0] for _ in range(args.repeats)]
            ref = [hf_generate_timed(hf, prompts, 1)[0] for _ in range(args.repeats)]
            row = {"tokens": length, "ours_tok_s": length / min(ours), "hf_tok_s": length / min(ref),
                   "ratio": min(ref) / min(ours), "ours_runs_s": ours, "hf_runs_s": ref}
            record("prefill", row, prefill_line(row))

        steps = args.decode_tokens - 1
        for context in args.contexts:
            hf_batch1 = None
            for batch in sorted(args.batches):
                prompts = _random_prompts(batch, context, vocab, context + batch)
                ours = [ours_timed(llm, prompts, args.decode_tokens)[1] for _ in range(args.repeats)]
                ref = [hf_generate_timed(hf, prompts, args.decode_tokens)[1] for _ in range(args.repeats)]
                ours_rate, hf_rate = batch * steps / min(ours), batch * steps / min(ref)
                hf_batch1 = hf_rate if batch == 1 else hf_batch1
                row = {"batch": batch, "context": context, "ours_tok_s": ours_rate, "hf_tok_s": hf_rate,
                       "ratio_same_batch": ours_rate / hf_rate,
                       "ratio_vs_hf_batch1": ours_rate / hf_batch1 if hf_batch1 else None,
                       "ours_runs_s": ours, "hf_runs_s": ref}
                record("decode", row, decode_line(row))
    write_report("speed", result, out)
    print((out / "speed.md").read_text())
    return result
