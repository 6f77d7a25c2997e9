"""`bench longctx` results summarised: a table per task and length, and a plot of accuracy against KV
bytes per method."""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path
from statistics import mean

from .plotting import caption, pyplot, save
from .provenance import versions

MIB = 1024**2
BASELINE = ("transformers", "full")


def _mean(values):
    values = [v for v in values if v is not None]
    return mean(values) if values else None


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (system, method, task, length) with means, and ratios against transformers' full cache."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["system"], row["method"], row["task"], row["length"])].append(row)
    summary = []
    for (system, method, task, length), group in groups.items():
        summary.append({
            "system": system, "method": method, "task": task, "length": length, "cases": len(group),
            "accuracy": _mean(r["score"] for r in group),
            "perplexity": _mean(r["perplexity"] for r in group),
            "prefill_seconds": _mean(r["prefill_seconds"] for r in group),
            "decode_tokens_per_second": _mean(r["decode_tokens_per_second"] for r in group),
            "kv_bytes": _mean(r["kv_bytes"] for r in group),
            "kv_peak_bytes": _mean(r["kv_peak_bytes"] for r in group),
            "peak_rss_bytes": max((r["peak_rss_bytes"] or 0) for r in group) or None,
        })
    baselines = {(s["task"], s["length"]): s for s in summary if (s["system"], s["method"]) == BASELINE}
    for entry in summary:
        base = baselines.get((entry["task"], entry["length"]))
        speed, base_speed = entry["decode_tokens_per_second"], base and base["decode_tokens_per_second"]
        entry["decode_vs_transformers"] = speed / base_speed if speed and base_speed else None
        entry["kv_vs_full"] = entry["kv_bytes"] / base["kv_bytes"] if base and base["kv_bytes"] else None
    return summary


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    took = "time not recorded" if result["seconds"] is None else f"{result['seconds']} s in all"
    if result.get("cut_short"):
        took += f", {result['cut_short']}"
    lines = [
        f"Command: `{result['command']}`", "",
        f"{caption(result)}; {result['setting']}; {versions(result)}; seed {result['seed']}, prefill chunk {result['prefill_chunk_size']} tokens "
        f"(ours compresses after each), {took}. KV x full: KV bytes held while decoding over "
        "transformers' full cache on the same case. Decode x HF: decode tokens/s over transformers' full cache in the same run.", "",
    ]
    by_table = defaultdict(list)
    for entry in result["summary"]:
        by_table[(entry["length"], entry["task"])].append(entry)
    for (length, task), entries in sorted(by_table.items()):
        metric = "perplexity" if task == "perplexity" else "accuracy"
        lines += [
            f"### {task}, {length} tokens ({entries[0]['cases']} cases)", "",
            f"| system | method | {metric} | prefill s | decode tok/s | decode x HF | KV MiB | KV x full | KV peak MiB | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        order = sorted(entries, key=lambda e: (e["perplexity"] if metric == "perplexity" else -(e["accuracy"] or 0)))
        for e in order:
            lines.append(
                f"| {e['system']} | {e['method']} | {_fmt(e[metric], '.3f')} | {_fmt(e['prefill_seconds'], '.2f')} | "
                f"{_fmt(e['decode_tokens_per_second'], '.1f')} | {_fmt(e['decode_vs_transformers'], '.2f')} | "
                f"{_fmt(e['kv_bytes'] and e['kv_bytes'] / MIB, '.1f')} | {_fmt(e['kv_vs_full'], '.3f')} | "
                f"{_fmt(e['kv_peak_bytes'] and e['kv_peak_bytes'] / MIB, '.1f')} | "
                f"{_fmt(e['peak_rss_bytes'] and e['peak_rss_bytes'] / MIB, '.0f')} |"
            )
        lines.append("")
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both less memory and more accuracy, by memory."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def _place_labels(ax, labels: list[tuple[tuple[float, float], str, str]], line_px: float = 11, width_px: float = 260) -> None:
    """Write each (point, text, color) label beside its point; a label that would overlap one
    already written (nearby, higher up) moves down below it."""
    points_per_px = 72 / ax.figure.dpi
    placed: list[tuple[float, float]] = []
    for (x, y), text, color in sorted(labels, key=lambda label: -label[0][1]):
        px, py = ax.transData.transform((x, y))
        top = py + 4
        while any(abs(qx - px) < width_px and qy - line_px < top < qy + line_px for qx, qy in placed):
            top = min(qy for qx, qy in placed if abs(qx - px) < width_px and qy - line_px < top < qy + line_px) - line_px
        placed.append((px, top))
        ax.annotate(text, (x, y), fontsize=7, color=color, textcoords="offset points",
                    xytext=(6, (top - py) * points_per_px))


SYSTEM_STYLE = {"tokensieve": ("C0", "o"), "transformers": ("C7", "s"), "kvpress": ("C1", "^")}


def write_plot(result: dict, path: Path) -> None:
    """Accuracy (mean over the accuracy tasks; perplexity when the run has no other task) against KV
    MiB while decoding, one panel per context length, a marker per system; methods that land on the
    same point share one label per system."""
    plt = pyplot()
    metric = "accuracy" if any(e["accuracy"] is not None for e in result["summary"]) else "perplexity"
    sign = 1 if metric == "accuracy" else -1  # the Pareto front wants higher is better
    entries = [e for e in result["summary"] if e[metric] is not None and e["kv_bytes"]]
    lengths = sorted({e["length"] for e in entries})
    tasks = sorted({e["task"] for e in entries})
    fig, axes = plt.subplots(1, len(lengths), figsize=(7 * len(lengths), 5), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        methods = defaultdict(list)
        for e in entries:
            if e["length"] == length:
                methods[(e["system"], e["method"])].append(e)
        points, labels = {}, defaultdict(list)
        for (system, method), group in methods.items():
            points[(system, method)] = (mean(e["kv_bytes"] for e in group) / MIB, mean(e[metric] for e in group))
        for (system, method), (x, y) in points.items():  # methods on one point share a label
            labels[(system, round(x), round(y, 3))].append(method)
        for system, (color, marker) in SYSTEM_STYLE.items():
            mine = [xy for (s, _), xy in points.items() if s == system]
            ax.scatter([x for x, _ in mine], [y for _, y in mine], color=color, marker=marker, s=40, label=system, zorder=3)
        ax.set_xlim(0, max(x for x, _ in points.values()) * 1.15)
        low, high = min(y for _, y in points.values()), max(y for _, y in points.values())
        span = (high - low) or 1.0
        ax.set_ylim(low - 0.12 * span, high + 0.08 * span)  # room for stacked labels; fixed before they are placed
        _place_labels(ax, [((x, y), ", ".join(sorted(names)), SYSTEM_STYLE.get(system, ("black",))[0])
                           for (system, x, y), names in labels.items()])
        front = pareto_front([(x, sign * y) for x, y in points.values()])
        ax.plot([x for x, _ in front], [sign * y for _, y in front], "--", color="tab:green", lw=1, label="Pareto front")
        ax.set(xlabel="KV cache MiB while decoding", ylabel=metric + (" (mean over tasks)" if len(tasks) > 1 else ""),
               title=textwrap.fill(f"{', '.join(tasks)}: {length} tokens, {result['setting']}", 70))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center right")
    fig.suptitle(f"bench longctx: {caption(result)}", fontsize=10)
    save(fig, path)
