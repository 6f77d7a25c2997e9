"""`bench spec` results summarised: a Markdown table per category and a plot of each category's
speedup over our plain decoding, speculative and transformers' prompt lookup."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .plotting import caption, pyplot, save
from .provenance import versions


def summarize(rows: list[dict]) -> dict:
    """Per category and overall: accepted tokens per step, tokens/s and speedups."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["category"]].append(row)
    groups["overall"] = list(rows)
    summary = {}
    for category, items in groups.items():
        tokens = sum(r["tokens"] for r in items)
        entry = {
            "prompts": len(items),
            "tokens": tokens,
            "tokens_per_step": sum(r["tokens"] - 1 for r in items) / max(1, sum(r["spec_decode_forwards"] for r in items)),
            "plain_tok_s": tokens / sum(r["plain_s"] for r in items),
            "spec_tok_s": tokens / sum(r["spec_s"] for r in items),
            "identical": sum(r["identical"] for r in items),
        }
        entry["speedup_vs_plain"] = entry["spec_tok_s"] / entry["plain_tok_s"]
        entry["decode_speedup_vs_plain"] = sum(r["plain_s"] - r["plain_first_s"] for r in items) / sum(
            r["spec_s"] - r["spec_first_s"] for r in items
        )
        if all("hf_s" in r for r in items):
            hf_tokens = sum(r["hf_tokens"] for r in items)
            entry["hf_lookup_tok_s"] = hf_tokens / sum(r["hf_s"] for r in items)
            entry["speedup_vs_hf_lookup"] = entry["spec_tok_s"] / entry["hf_lookup_tok_s"]
        summary[category] = entry
    return summary


def markdown(result: dict) -> str:
    summary = result["summary"]
    has_hf = "hf_lookup_tok_s" in summary["overall"]
    lines = [
        f"Command: `{result['command']}`", "",
        f"{caption(result)}; drafters {result['settings']['drafters']}; {versions(result)}.", "",
        "| category | prompts | tokens/step | plain tok/s | spec tok/s | vs plain | decode vs plain |"
        + (" HF lookup tok/s | vs HF lookup |" if has_hf else "") + " identical |",
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if has_hf else "") + "---:|",
    ]
    for category, e in summary.items():
        hf = f" {e['hf_lookup_tok_s']:.1f} | {e['speedup_vs_hf_lookup']:.2f}x |" if has_hf else ""
        lines.append(
            f"| {category} | {e['prompts']} | {e['tokens_per_step']:.2f} | {e['plain_tok_s']:.1f} | {e['spec_tok_s']:.1f} "
            f"| {e['speedup_vs_plain']:.2f}x | {e['decode_speedup_vs_plain']:.2f}x |{hf} {e['identical']}/{e['prompts']} |"
        )
    return "\n".join(lines) + "\n"


def write_plot(result: dict, path: Path) -> None:
    """Per category, tokens/s over our plain decoding's: speculative decoding (end to end and decode
    alone) and transformers' generate with prompt lookup; plain decoding is the line at 1."""
    plt = pyplot()
    summary = result["summary"]
    categories = list(summary)
    bars = [("tokensieve speculative", lambda e: e["speedup_vs_plain"], "C0"),
            ("tokensieve speculative, decode only", lambda e: e["decode_speedup_vs_plain"], "C9")]
    if "hf_lookup_tok_s" in summary["overall"]:
        bars.append(("transformers prompt lookup", lambda e: e["hf_lookup_tok_s"] / e["plain_tok_s"], "C1"))
    fig, ax = plt.subplots(figsize=(12, 4.8))
    width = 0.8 / len(bars)
    for index, (label, value_of, color) in enumerate(bars):
        xs = [c + (index - (len(bars) - 1) / 2) * width for c in range(len(categories))]
        values = [value_of(summary[c]) for c in categories]
        ax.bar(xs, values, width, color=color, label=label)
        for x, value in zip(xs, values):
            ax.annotate(f"{value:.2f}", (x, value), ha="center", va="bottom", fontsize=6, xytext=(0, 1), textcoords="offset points")
    ax.axhline(1.0, color="black", lw=1, label="tokensieve plain decoding")
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    ax.set(ylabel="tokens/s over our plain decoding", xlim=(-0.6, len(categories) - 0.4))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    settings = result["settings"]
    ax.set_title(f"bench spec: Spec-Bench, {settings['per_category']} prompts per category, {settings['max_tokens']} new tokens, "
                 f"greedy, batch 1\n{caption(result)}", fontsize=10)
    save(fig, path)
