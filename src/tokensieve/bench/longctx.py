"""`tokensieve bench longctx`: accuracy, speed and memory of KV policies on long-context tasks,
beside transformers with a full cache and kvpress's presses, on the same cases in one run."""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import DTYPES, KVPolicyConfig, KVSelectionConfig
from .longctx_report import summarize
from .longctx_systems import OursSystem, TransformersSystem, score
from .longctx_tasks import CaseMaker
from .plotting import require_matplotlib
from .provenance import engine_settings, run_info
from .report import write_report

RUN_FILE, CASES_FILE = "longctx_run.json", "longctx_cases.jsonl"


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory since the last reset_peak_rss() (Linux), else None."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _kvpress_available() -> bool:
    try:
        import kvpress  # noqa: F401
    except ImportError:
        return False
    return True


def build_systems(args, llm, hf_model):
    systems = [OursSystem(llm, KVPolicyConfig("full"), args.query_aware)]
    for ratio in args.selections:
        for shortlist in [None, *args.shortlists]:
            selection = KVSelectionConfig(ratio=ratio, shortlist=shortlist)
            systems.append(OursSystem(llm, KVPolicyConfig("full"), args.query_aware, selection))
    variants = [{}] + [{"merge_above": args.merge_above}] * (args.merge_above is not None) + (
        [{"retrieval_heads": args.retrieval_heads}] * (args.retrieval_heads is not None)
    )
    for name in args.policies:
        for ratio in args.keep_ratios:
            for variant in variants:
                config = KVPolicyConfig(name, keep_ratio=ratio, allocation=args.allocation, **variant)
                systems.append(OursSystem(llm, config, args.query_aware))
    for kv_dtype in args.kv_dtypes:
        systems.append(OursSystem(llm, KVPolicyConfig("full"), args.query_aware, kv_dtype=kv_dtype))
        for name in args.quantized_policies:
            for ratio in args.keep_ratios:
                for variant in variants:
                    config = KVPolicyConfig(name, keep_ratio=ratio, allocation=args.allocation, **variant)
                    systems.append(OursSystem(llm, config, args.query_aware, kv_dtype=kv_dtype))
    if hf_model is not None:
        if "kvzip" in args.presses:
            _name_tokenizer_folder(hf_model, llm.tokenizer, Path(tempfile.mkdtemp(prefix="tokensieve-tokenizer-")))
        systems.append(TransformersSystem(hf_model, llm.tokenizer, None, None, args.query_aware))
        head_scores = llm.engine.retrieval_scores() if "duo_attention" in args.presses else None
        for press in args.presses:
            for ratio in args.keep_ratios:
                systems.append(TransformersSystem(hf_model, llm.tokenizer, press, ratio, args.query_aware, head_scores))
    return systems


def _name_tokenizer_folder(hf_model, tokenizer, folder: Path) -> None:
    """kvpress's KVzip loads the tokenizer from the model's name_or_path, which for a GGUF file is a folder
    transformers reads no tokenizer from without the file's name: point it at a copy of ours."""
    tokenizer.save_pretrained(folder)
    hf_model.config.name_or_path = str(folder)


def run_longctx_benchmark(args) -> dict:
    from tqdm import tqdm

    from ..llm import LLM
    from .hf_baseline import load_hf_model

    require_matplotlib()
    torch.set_num_threads(args.threads)
    info = run_info(args)  # before the run: the commit and machine that ran it
    llm = LLM(  # no prefix caching: every system computes every case's prompt, as transformers does
        args.model, dtype=args.dtype, device=args.device, activations=args.activations, kv_dtype=args.kv_dtype,
        kv_cache_bytes=args.kv_cache_bytes,
        prefill_chunk_size=args.prefill_chunk_size, max_batched_tokens=max(2048, args.prefill_chunk_size),
        prefix_caching=False,
    )
    info |= engine_settings(llm.engine)
    hf_model = None if args.no_transformers else load_hf_model(args.model, DTYPES[args.dtype])
    if hf_model is None:
        args.presses = []
    elif args.presses and not _kvpress_available():
        print("kvpress is not installed (pip install 'tokensieve[kvpress]'): its presses are skipped")
        args.presses = []
    maker = CaseMaker(llm.tokenizer, args.seed)
    cases = [maker.make(t, n, i) for n in args.lengths for t in args.tasks for i in range(args.cases)]
    systems = build_systems(args, llm, hf_model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = info | {
        "setting": "query-aware" if args.query_aware else "query-agnostic", "prefill_chunk_size": args.prefill_chunk_size,
        "seed": args.seed, "systems": len(systems), "planned_cases": len(cases),
    }
    (out / RUN_FILE).write_text(json.dumps(run, indent=1))  # with the per-case lines, a run cut short can be reported
    rows = []
    partial = (out / CASES_FILE).open("w")  # every case as soon as it is done
    started = time.perf_counter()
    try:
        with partial, tqdm(total=len(cases) * len(systems), desc="bench longctx", unit="case") as progress:
            for case in cases:  # every system on a case before the next: slow drift of the machine hits all alike
                for system in systems:
                    progress.set_postfix_str(f"{case.task}@{case.length} {system.system}:{system.label}")
                    reset_peak_rss()
                    answer = system.answer(case)
                    rows.append({
                        "system": system.system, "method": system.label, "task": case.task, "length": case.length,
                        "case": case.index, "prompt_tokens": len(case.context_ids) + len(case.question_ids),
                        "score": None if answer.perplexity is not None else score(case, answer),
                        **asdict(answer), "peak_rss_bytes": peak_rss_bytes(),
                    })
                    partial.write(json.dumps(rows[-1]) + "\n")
                    partial.flush()
                    progress.update()
    except KeyboardInterrupt:
        print("bench longctx: interrupted; the report covers the cases every system finished")
    result = finished_result(run, rows, round(time.perf_counter() - started, 1))
    write_report("longctx", result, out)
    print((out / "longctx.md").read_text())
    return result


def finished_result(run: dict, rows: list[dict], seconds: float | None) -> dict:
    """The result of a run from its rows, keeping only the cases every system finished (all of them unless
    the run was cut short)."""
    counts = Counter((row["task"], row["length"], row["case"]) for row in rows)
    rows = [row for row in rows if counts[(row["task"], row["length"], row["case"])] == run["systems"]]
    done = len(rows) // run["systems"]
    cut_short = f"cut short after {done} of {run['planned_cases']} cases" if done < run["planned_cases"] else None
    return run | {"seconds": seconds, "cut_short": cut_short, "summary": summarize(rows), "cases": rows}


def result_of_cut_run(folder: Path) -> dict:
    """The result of a run stopped before it wrote longctx.json, from its recorded settings and case lines."""
    run = json.loads((folder / RUN_FILE).read_text())
    rows = [json.loads(line) for line in (folder / CASES_FILE).read_text().splitlines() if line.strip()]
    return finished_result(run, rows, None)
