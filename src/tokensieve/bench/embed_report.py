"""`bench embed` results as a Markdown table per text length and a plot of speed against fidelity."""

from __future__ import annotations

from pathlib import Path

from .plotting import pyplot, save
from .provenance import versions

TARGET_LENGTH, TARGET_SPEED, TARGET_COSINE = 256, 1.6, 0.98
HEADER = ("| tokens | system | texts/s | vs sentence-transformers | vs unmerged | cosine to unmerged "
          "| top-10 overlap | Spearman |\n|---:|---|---:|---:|---:|---:|---:|---:|")


def result_line(row: dict) -> str:
    return (f"| {row['length']} | {row['system']} | {row['texts_per_s']:.1f} | {row['vs_sentence_transformers']:.2f}x "
            f"| {row['vs_unmerged']:.2f}x | {row['cosine']:.4f} | {row['neighbour_overlap']:.3f} | {row['spearman']:.4f} |")


def _caption(result: dict) -> str:
    return f"{result['model']}, {result['dtype']}, {result['threads']} threads, {result['machine']}"


def markdown(result: dict) -> str:
    lines = [
        f"Command: `{result['command']}`", "",
        f"{_caption(result)}; {versions(result)}, sentence-transformers {result['sentence_transformers']}. "
        f"{result['texts']} texts of Spec-Bench per length, batch {result['batch_size']}, median of {result['repeats']} "
        "interleaved runs. Fidelity is against our unmerged model on the same texts; the unmerged model's "
        "mean cosine to sentence-transformers is "
        + ", ".join(f"{r['cosine_to_sentence_transformers']:.6f} at {r['length']}"
                    for r in result["rows"] if r["system"] == "unmerged") + ".",
        "", HEADER, *map(result_line, result["rows"]), "",
    ]
    return "\n".join(lines)


def write_plot(result: dict, path: Path) -> None:
    """Per text length: speed against sentence-transformers (x) and cosine to the unmerged model (y),
    one marker per merging method."""
    plt = pyplot()
    lengths = sorted({row["length"] for row in result["rows"]})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 4.2), squeeze=False)
    methods = sorted({row["system"].split()[0] for row in result["rows"]})
    for ax, length in zip(axes[0], lengths):
        for index, method in enumerate(methods):
            rows = [r for r in result["rows"] if r["length"] == length and r["system"].split()[0] == method]
            ax.scatter([r["vs_sentence_transformers"] for r in rows], [r["cosine"] for r in rows],
                       color=f"C{index}", label=method, s=28)
        ax.axvline(1.0, color="grey", lw=0.8, ls=":")
        if length == TARGET_LENGTH:  # issue 28's bar: this fast, this close to the unmerged model
            ax.axvline(TARGET_SPEED, color="black", lw=0.8, ls="--")
            ax.axhline(TARGET_COSINE, color="black", lw=0.8, ls="--", label="target")
        ax.set(title=f"{length} tokens", xlabel="texts/s vs sentence-transformers", ylabel="mean cosine to unmerged")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"bench embed: {_caption(result)}", fontsize=10)
    save(fig, path)
