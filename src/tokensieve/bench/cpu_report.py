"""`bench cpu` results: the ratios against llama.cpp and the targets of issue 26 (decode at least 1.3x
llama.cpp's tokens/s at every context, prefill at least 2x, cold start at most 2 s, peak memory at most
1.5x llama.cpp's), a Markdown table and a plot."""

from __future__ import annotations

from pathlib import Path

from .plotting import caption, pyplot, save
from .provenance import versions

OURS, LLAMACPP = "tokensieve", "llama.cpp"
PREFILL_TARGET, DECODE_TARGET = 2.0, 1.3  # at least, our tokens/s over llama.cpp's
COLD_START_TARGET_S = 2.0  # at most
MEMORY_TARGET = 1.5  # at most, our peak RSS over llama.cpp's

SPEED_HEADER = ("| context tokens | engine | prefill tok/s | decode tok/s | prefill vs llama.cpp | decode vs llama.cpp |\n"
                "|---:|---|---:|---:|---:|---:|")
PROCESS_HEADER = f"| fresh process | {OURS} | {LLAMACPP} | {OURS} / {LLAMACPP} |\n|---|---:|---:|---:|"
TARGET_HEADER = "| target | measured | met |\n|---|---:|---|"


def speed_ratio(result: dict, context: int, measure: str) -> float | None:
    """Our `measure` (prefill_tok_s or decode_tok_s) over llama.cpp's at `context`; None without llama.cpp."""
    rows = {r["engine"]: r for r in result["speed"] if r["context"] == context}
    if OURS not in rows or LLAMACPP not in rows:
        return None
    return rows[OURS][measure] / rows[LLAMACPP][measure]


def process_ratio(result: dict, kind: str, key: str) -> float | None:
    """Ours over llama.cpp's of a fresh-process measure (kind cold_start or peak_memory)."""
    values = result[kind]
    if OURS not in values or LLAMACPP not in values:
        return None
    return values[OURS][key] / values[LLAMACPP][key]


def _check(name: str, bound: str, value: float | None, unit: str, met) -> dict:
    return {"target": name, "bound": bound, "value": value, "unit": unit, "met": None if value is None else met(value)}


def target_checks(result: dict) -> list[dict]:
    """Each target with the measured value and whether it is met (None where it was not measured)."""
    checks = []
    for context in result["contexts"]:
        checks.append(_check(f"prefill, {context} tokens", f">= {PREFILL_TARGET}x llama.cpp",
                             speed_ratio(result, context, "prefill_tok_s"), "x", lambda v: v >= PREFILL_TARGET))
        checks.append(_check(f"decode, {context} tokens", f">= {DECODE_TARGET}x llama.cpp",
                             speed_ratio(result, context, "decode_tok_s"), "x", lambda v: v >= DECODE_TARGET))
    ours_start = result["cold_start"].get(OURS)
    checks.append(_check("cold start to the first token", f"<= {COLD_START_TARGET_S} s",
                         ours_start["first_output_s"] if ours_start else None, "s", lambda v: v <= COLD_START_TARGET_S))
    checks.append(_check("peak memory", f"<= {MEMORY_TARGET}x llama.cpp",
                         process_ratio(result, "peak_memory", "peak_rss_mb"), "x", lambda v: v <= MEMORY_TARGET))
    return checks


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def speed_line(result: dict, row: dict) -> str:
    """A (context, engine) row; the ratios on our rows."""
    ours = row["engine"] == OURS
    prefill = _ratio(speed_ratio(result, row["context"], "prefill_tok_s")) if ours else ""
    decode = _ratio(speed_ratio(result, row["context"], "decode_tok_s")) if ours else ""
    return (f"| {row['context']} | {row['engine']} | {row['prefill_tok_s']:.1f} | {row['decode_tok_s']:.1f} "
            f"| {prefill} | {decode} |")


def _process_line(result: dict, label: str, kind: str, key: str, digits: int) -> str:
    values = [f"{result[kind][e][key]:.{digits}f}" if e in result[kind] else "-" for e in (OURS, LLAMACPP)]
    return f"| {label} | {values[0]} | {values[1]} | {_ratio(process_ratio(result, kind, key))} |"


def target_line(check: dict) -> str:
    if check["value"] is None:
        return f"| {check['target']}: {check['bound']} | - | not measured |"
    value = f"{check['value']:.2f}{'x' if check['unit'] == 'x' else ' s'}"
    return f"| {check['target']}: {check['bound']} | {value} | {'yes' if check['met'] else 'NO'} |"


def markdown(result: dict) -> str:
    repeats, tokens = result["repeats"], result["decode_tokens"]
    lines = [
        f"Command: `{result['command']}`", "",
        f"{caption(result)}; native kernels {'on' if result['native_kernels'] else 'off'}; {versions(result)}; "
        f"llama-cpp-python {result['llama_cpp_python'] or '-'} on the same GGUF file (n_ctx {result['n_ctx']}, "
        f"n_batch {result['n_batch']}, its default). Batch 1, the same Spec-Bench token ids for both engines, greedy; "
        f"prefill tok/s is the context over the time to the first token, decode tok/s the {tokens} tokens after it "
        f"over their time; median of {repeats} runs, the engines interleaved, after a warm-up of each. 1-minute load "
        f"average at the start: {result['load_average']:.2f}.", "",
    ]
    if result["skipped"]:
        lines += [f"Skipped: {'; '.join(result['skipped'])}.", ""]
    lines += [SPEED_HEADER, *(speed_line(result, row) for row in result["speed"]), ""]
    lines += [
        f"Fresh processes, one engine at a time. Cold start: from starting the process to the first byte it writes "
        f"(the first token of a short prompt: `tokensieve generate --max-tokens 1` / llama-cpp-python's completion of "
        f"one token), weights in the page cache after an untimed run; median of {repeats}. Peak memory: the process's "
        f"own peak RSS (mapped weight pages included) after loading, prefilling the longest context and decoding "
        f"{tokens} tokens.", "",
        PROCESS_HEADER,
        _process_line(result, "cold start to the first token, s", "cold_start", "first_output_s", 2),
        _process_line(result, "cold start to the exit, s", "cold_start", "exit_s", 2),
        _process_line(result, "peak memory, MB", "peak_memory", "peak_rss_mb", 0), "",
        TARGET_HEADER, *map(target_line, result["targets"]),
    ]
    return "\n".join(lines) + "\n"


def _bars(ax, labels: list[str], series: dict[str, list[float | None]], ratios: list[float | None]) -> None:
    """Bars per label, an engine beside the other; our bar is marked with its ratio to llama.cpp's."""
    width = 0.8 / len(series)
    for index, (engine, values) in enumerate(series.items()):
        xs = [x + (index - (len(series) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, [v or 0 for v in values], width, color="C0" if engine == OURS else "C1", label=engine)
        if engine == OURS:
            for x, value, ratio in zip(xs, values, ratios):
                if ratio is not None:
                    ax.annotate(f"{ratio:.2f}x", (x, value), ha="center", va="bottom", fontsize=7,
                                xytext=(0, 1), textcoords="offset points")
    ax.set_xticks(range(len(labels)), labels)
    ax.grid(axis="y", alpha=0.3)


def write_plot(result: dict, path: Path) -> None:
    """Prefill and decode tokens/s per context, then cold start and peak memory, each engine's bar
    beside the other's; our bars carry the ratio to llama.cpp."""
    plt = pyplot()
    engines = [e for e in (OURS, LLAMACPP) if any(r["engine"] == e for r in result["speed"])]
    contexts = result["contexts"]
    fig, axes = plt.subplots(1, 4, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 3, 1.4, 1.4]})
    for ax, measure, title in ((axes[0], "prefill_tok_s", "prefill"), (axes[1], "decode_tok_s", "decode")):
        rows = {(r["context"], r["engine"]): r[measure] for r in result["speed"]}
        series = {e: [rows.get((c, e)) for c in contexts] for e in engines}
        _bars(ax, [str(c) for c in contexts], series, [speed_ratio(result, c, measure) for c in contexts])
        ax.set(xlabel="context tokens", ylabel=f"{title} tokens/s", title=f"{title} (batch 1)")
    for ax, kind, key, label in ((axes[2], "cold_start", "first_output_s", "seconds to the first token"),
                                 (axes[3], "peak_memory", "peak_rss_mb", "peak RSS, MB")):
        series = {e: [result[kind][e][key]] for e in engines if e in result[kind]}
        _bars(ax, [""], series, [process_ratio(result, kind, key)])
        ax.set(ylabel=label, title=kind.replace("_", " "))
    axes[2].axhline(COLD_START_TARGET_S, color="gray", linestyle="--", linewidth=1)
    axes[2].set_title(f"cold start\n(dashed: the {COLD_START_TARGET_S:g} s target)", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"bench cpu: tokensieve beside llama.cpp, same GGUF and threads\n{caption(result)}", fontsize=10)
    save(fig, path)
