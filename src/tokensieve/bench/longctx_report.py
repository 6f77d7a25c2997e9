"""Summaries of `bench longctx` results: a table per task and length, and accuracy against KV bytes."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean

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


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        f"# bench longctx ({result['setting']})", "",
        f"`{result['command']}`", "",
        f"model {result['model']}, {result['threads']} threads, seed {result['seed']}, torch {result['torch']}, "
        f"prefill chunk {result['prefill_chunk_size']} tokens (ours compresses after each), "
        f"{result['seconds']} s in all. KV x full: KV bytes held while decoding over transformers' full cache on "
        "the same case. Decode x HF: decode tokens/s over transformers' full cache in the same run.", "",
    ]
    by_table = defaultdict(list)
    for entry in result["summary"]:
        by_table[(entry["length"], entry["task"])].append(entry)
    for (length, task), entries in sorted(by_table.items()):
        metric = "perplexity" if task == "perplexity" else "accuracy"
        lines += [
            f"## {task}, {length} tokens ({entries[0]['cases']} cases)", "",
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
    path.write_text("\n".join(lines))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both less memory and more accuracy, by memory."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def write_plot(result: dict, path: Path) -> None:
    """Accuracy (mean over the accuracy tasks) against KV MiB, one panel per context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in result["summary"] if e["accuracy"] is not None and e["kv_bytes"]]
    lengths = sorted({e["length"] for e in entries})
    if not lengths:
        return
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.5), squeeze=False)
    colors = {"tokensieve": "tab:blue", "transformers": "tab:gray", "kvpress": "tab:orange"}
    for ax, length in zip(axes[0], lengths):
        methods = defaultdict(list)
        for e in entries:
            if e["length"] == length:
                methods[(e["system"], e["method"])].append(e)
        points = []
        for (system, method), group in methods.items():
            x, y = mean(e["kv_bytes"] for e in group) / MIB, mean(e["accuracy"] for e in group)
            points.append((x, y))
            ax.scatter(x, y, color=colors.get(system, "black"), s=30)
            ax.annotate(method, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_front(points)
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="tab:green", lw=1, label="Pareto front")
        for system, color in colors.items():
            ax.scatter([], [], color=color, label=system)
        ax.set(title=f"{length} tokens ({result['setting']})", xlabel="KV cache MiB while decoding", ylabel="accuracy")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
