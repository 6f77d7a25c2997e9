"""`bench speed` results as a Markdown table and a plot of tokens/s against context for each batch
size, ours beside transformers'; on CUDA the table adds the share of the memory bandwidth each decode
step's reads take."""

from __future__ import annotations

from pathlib import Path

from .plotting import caption, pyplot, save
from .provenance import versions

PREFILL_HEADER = "| prefill tokens | tokensieve tok/s | transformers tok/s | ratio |\n|---:|---:|---:|---:|"
DECODE_COLUMNS = ("| batch | context | tokensieve tok/s | transformers tok/s | vs transformers, same batch "
                  "| vs transformers, batch 1 |")


def prefill_line(row: dict) -> str:
    return f"| {row['tokens']} | {row['ours_tok_s']:.1f} | {row['hf_tok_s']:.1f} | {row['ratio']:.2f}x |"


def decode_line(row: dict) -> str:
    batch1 = "-" if row["ratio_vs_hf_batch1"] is None else f"{row['ratio_vs_hf_batch1']:.2f}x"
    line = (f"| {row['batch']} | {row['context']} | {row['ours_tok_s']:.1f} | {row['hf_tok_s']:.1f} "
            f"| {row['ratio_same_batch']:.2f}x | {batch1} |")
    if "ours_weights_bandwidth" not in row:  # measured on a CPU
        return line
    return line + (f" {row['ours_weights_bandwidth']:.1%} (transformers {row['hf_weights_bandwidth']:.1%}) "
                   f"| {row['ours_weights_kv_bandwidth']:.1%} (transformers {row['hf_weights_kv_bandwidth']:.1%}) |")


def markdown(result: dict) -> str:
    lines = [
        f"Command: `{result['command']}`", "",
        f"{caption(result)}; native kernels {'on' if result['native_kernels'] else 'off'}; "
        f"{versions(result)}. "
        f"Random prompt ids, greedy, {result['decode_tokens']} new tokens, best of {result['repeats']}; decode tok/s "
        f"counts the {result['decode_tokens'] - 1} steps after the first token, prefill the time to the first token."
        + _device_note(result), "",
    ]
    if result["prefill"]:
        lines += [PREFILL_HEADER, *map(prefill_line, result["prefill"]), ""]
    if result["decode"]:
        lines += [decode_header(result), *map(decode_line, result["decode"]), ""]
    return "\n".join(lines)


def decode_header(result: dict) -> str:
    """The decode table's header and rule; with the bandwidth columns where the run measured them (CUDA)."""
    columns = DECODE_COLUMNS
    if "bandwidth_gbs" in result:
        bandwidth = f"{result['bandwidth_gbs']:g} GB/s"
        columns += f" weights read, share of {bandwidth} | weights + KV read, share of {bandwidth} |"
    return columns + "\n|" + "---:|" * (columns.count("|") - 1)


def _device_note(result: dict) -> str:
    """Where the run's device and static decode settings were recorded (runs before them had none): say them."""
    if "device" not in result:
        return ""
    note = f" Device {result['device']}, static decode {result['static_decode']}."
    if "bandwidth_gbs" in result:
        note += (f" Bandwidth shares: the bytes a decode step must read (the weights, {result['weight_bytes'] / 1e9:.2f} GB "
                 f"with each tensor once; and the KV entries at the decode's mean context) over the step's time, against "
                 f"{result['bandwidth_gbs']:g} GB/s.")
    return note


def write_plot(result: dict, path: Path) -> None:
    """Decode tokens/s against context, a color per batch size (tokensieve solid, transformers dashed);
    beside it prefill tokens/s against prompt length."""
    plt = pyplot()
    fig, (decode_ax, prefill_ax) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    batches = sorted({row["batch"] for row in result["decode"]})
    for index, batch in enumerate(batches):
        rows = sorted((r for r in result["decode"] if r["batch"] == batch), key=lambda r: r["context"])
        contexts = [r["context"] for r in rows]
        color = f"C{index}"
        decode_ax.plot(contexts, [r["ours_tok_s"] for r in rows], "o-", color=color, label=f"tokensieve, batch {batch}")
        decode_ax.plot(contexts, [r["hf_tok_s"] for r in rows], "s--", color=color, label=f"transformers, batch {batch}")
    decode_ax.set(xscale="log", xlabel="context tokens", ylabel="decode tokens/s (all sequences)", title="decode")
    prefill = sorted(result["prefill"], key=lambda r: r["tokens"])
    prefill_ax.plot([r["tokens"] for r in prefill], [r["ours_tok_s"] for r in prefill], "o-", color="C0", label="tokensieve")
    prefill_ax.plot([r["tokens"] for r in prefill], [r["hf_tok_s"] for r in prefill], "s--", color="C7", label="transformers")
    prefill_ax.set(xscale="log", xlabel="prompt tokens", ylabel="prefill tokens/s", title="prefill (batch 1)")
    for ax in (decode_ax, prefill_ax):
        ticks = sorted({r["context"] for r in result["decode"]} if ax is decode_ax else {r["tokens"] for r in prefill})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"bench speed: {caption(result)}", fontsize=10)
    save(fig, path)
