"""`tokensieve bench spec`: speculative decoding on Spec-Bench's prompts, per category, beside our
plain decoding and transformers `generate` with prompt lookup, all in one process.

Every prompt runs greedy with each system, one request at a time. Tokens/s counts the new tokens
over the whole request (prefill included, the same prompt for every system); "decode vs plain"
leaves out each request's prefill and first token, which speculation cannot speed up. The
speculative output is checked token for token against plain decoding.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from ..config import SpeculativeConfig
from ..llm import LLM
from ..sampling_params import SamplingParams
from .hf_baseline import load_hf_model
from .plotting import require_matplotlib
from .provenance import engine_settings, run_info
from .report import write_report
from .spec_report import markdown, summarize

QUESTIONS = Path(__file__).parent / "data" / "spec_bench" / "question.jsonl"


def load_prompts(path: Path, per_category: int) -> list[dict]:
    """The first `per_category` questions of every category (first turn only), in file order."""
    taken: dict[str, int] = defaultdict(int)
    prompts = []
    for line in Path(path).read_text().splitlines():
        question = json.loads(line)
        category = question["category"]
        if taken[category] < per_category:
            taken[category] += 1
            prompts.append({"category": category, "id": question["question_id"], "text": question["turns"][0]})
    return prompts


def _run_ours(llm: LLM, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], float, float, int]:
    """Tokens, seconds, seconds to the first token, and forwards after the first token (each emits one
    token or more), of one request."""
    engine = llm.engine
    request_id = engine.add_request(prompt_ids, params)
    seq = engine.sequence(request_id)
    decode_forwards, first_token_s, started = 0, 0.0, time.perf_counter()
    try:
        while engine.has_unfinished():
            decode_forwards += seq.num_output_tokens > 0
            engine.step()
            if not first_token_s and seq.num_output_tokens:
                first_token_s = time.perf_counter() - started
        return list(seq.output_token_ids), time.perf_counter() - started, first_token_s, decode_forwards
    finally:
        engine.abort(request_id)


def _run_hf(hf_model, prompt_ids: list[int], new_tokens: int, lookup_tokens: int, eos: int) -> tuple[list[int], float]:
    ids = torch.tensor([prompt_ids], device=hf_model.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
            prompt_lookup_num_tokens=lookup_tokens, pad_token_id=eos, eos_token_id=eos,
        )
    return out[0, len(prompt_ids) :].tolist(), time.perf_counter() - started


def run_spec_benchmark(args) -> dict:
    require_matplotlib()
    torch.set_num_threads(args.threads)
    info = run_info(args)  # before the run: the commit and machine that ran it
    prompts = load_prompts(Path(args.questions), args.per_category)
    config = SpeculativeConfig(drafters=args.drafters, max_nodes=args.max_nodes).on_device(args.device)
    # no prefix caching: the prompts share the chat template's first tokens, and each must be computed whole
    plain = LLM(args.model, dtype=args.dtype, device=args.device, activations=args.activations, kv_dtype=args.kv_dtype,
                prefix_caching=False)
    info |= engine_settings(plain.engine)
    spec = plain.with_options(speculative=config)
    hf_model = None if args.no_transformers else load_hf_model(args.model, torch.float32, args.device)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    eos = plain.tokenizer.eos_token_id
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _run_ours(spec, plain.encode("Hello"), SamplingParams(max_tokens=16, temperature=0))  # measures latency once
    rows = []
    with open(out / "spec_cases.jsonl", "w") as cases:
        for index, prompt in enumerate(prompts):
            ids = plain.encode([{"role": "user", "content": prompt["text"]}])
            plain_tokens, plain_s, plain_first_s, _ = _run_ours(plain, ids, params)
            spec_tokens, spec_s, spec_first_s, spec_forwards = _run_ours(spec, ids, params)
            row = {
                **{k: prompt[k] for k in ("category", "id")}, "prompt_tokens": len(ids), "tokens": len(plain_tokens),
                "plain_s": plain_s, "spec_s": spec_s, "plain_first_s": plain_first_s, "spec_first_s": spec_first_s,
                "spec_decode_forwards": spec_forwards,
                "identical": spec_tokens == plain_tokens,
            }
            if hf_model is not None:
                hf_tokens, row["hf_s"] = _run_hf(hf_model, ids, args.max_tokens, args.hf_lookup_tokens, eos)
                row["hf_tokens"] = len(hf_tokens)
            rows.append(row)
            cases.write(json.dumps(row) + "\n")
            cases.flush()
            print(f"[{index + 1}/{len(prompts)}] {row['category']}: {row['tokens']} tokens, "
                  f"{plain_s / spec_s:.2f}x vs plain" + (f", {row['hf_s'] / spec_s:.2f}x vs HF lookup" if "hf_s" in row else ""),
                  flush=True)
    settings = {key: getattr(args, key) for key in ("per_category", "max_tokens", "drafters", "hf_lookup_tokens")}
    settings |= {"max_nodes": config.max_nodes, "recycling_slots": config.recycling_slots}
    result = info | {"settings": settings, "summary": summarize(rows), "cases": rows}
    write_report("spec", result, out)
    print(markdown(result))
    return result
