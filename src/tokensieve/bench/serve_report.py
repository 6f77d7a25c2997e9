"""`bench serve` results: the statistics of a run's requests (mean, p50, p99 of TTFT, TPOT and ITL;
request and token throughput; Jain's fairness index), the ratios the serving issue targets, a
Markdown table and a plot."""

from __future__ import annotations

import math
from pathlib import Path

from .plotting import caption, pyplot, save
from .provenance import versions


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_stats(values: list[float]) -> dict | None:
    """Mean, median and 99th percentile, in seconds; None when there is nothing to measure."""
    if not values:
        return None
    return {"mean": sum(values) / len(values), "p50": percentile(values, 50), "p99": percentile(values, 99), "n": len(values)}


def jain_index(amounts: list[float]) -> float | None:
    """Jain's fairness index (sum x)^2 / (n sum x^2): 1 when every client got the same, 1/n when one
    client got everything; None without clients or without any service."""
    square_sum = sum(x * x for x in amounts)
    if not amounts or square_sum == 0:
        return None
    return sum(amounts) ** 2 / (len(amounts) * square_sum)


def tokens_before(record: dict, end: float) -> float:
    """The tokens of a request that had arrived at `end` (seconds from the run's start): its tokens in
    the share of its text chunks that came by then."""
    times = record.get("chunk_times") or []
    if not times:
        return 0.0
    return record["tokens"] * sum(t <= end for t in times) / len(times)


def summarize_requests(records: list[dict], duration: float) -> dict:
    """Request and token throughput over the run's wall time, and latency statistics over the
    requests that completed."""
    done = [r for r in records if r["ok"]]
    tokens = sum(r["tokens"] for r in done)
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "output_tokens": tokens,
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in done),
        "duration_s": duration,
        "request_throughput": len(done) / duration if duration else 0.0,
        "output_token_throughput": tokens / duration if duration else 0.0,
        "ttft": latency_stats([r["ttft"] for r in done]),
        "tpot": latency_stats([r["tpot"] for r in done if r["tpot"] is not None]),
        "itl": latency_stats([gap for r in done for gap in r["itl"]]),
        "e2e": latency_stats([r["e2e"] for r in done]),
    }


def fairness(records: list[dict], users: list[str]) -> dict:
    """Service per client while every client is still sending: from the start until the first client's
    last request ends. Jain's index of the tokens each client received in that window."""
    ends = []
    for user in users:
        own = [r for r in records if r["user"] == user and r["ok"]]
        if own:
            ends.append(max(r["start"] + r["e2e"] for r in own))
    window = min(ends) if ends else 0.0
    tokens = {user: sum(tokens_before(r, window) for r in records if r["user"] == user and r["ok"]) for user in users}
    return {"window_s": window, "tokens_in_window": tokens, "jain": jain_index(list(tokens.values()))}


def per_user(records: list[dict]) -> dict:
    users = sorted({r["user"] for r in records})
    out = {}
    for user in users:
        own = [r for r in records if r["user"] == user]
        done = [r for r in own if r["ok"]]
        out[user] = {"requests": len(own), "completed": len(done), "tokens": sum(r["tokens"] for r in done),
                     "ttft": latency_stats([r["ttft"] for r in done])}
    return out


def light_ttft(run: dict, records: list[dict]) -> dict | None:
    """TTFT statistics over the light clients' requests of a fairness run."""
    light = set(run["light_users"])
    return latency_stats([r["ttft"] for r in records if r["ok"] and r["user"] in light])


def _find(runs: list[dict], **match) -> dict | None:
    for run in runs:
        if all(run.get(key) == value for key, value in match.items()):
            return run
    return None


def _throughput(run: dict | None) -> float | None:
    return run["summary"]["output_token_throughput"] if run and run["summary"]["completed"] else None


def _ratio(numerator, denominator) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def ratios(result: dict) -> dict:
    """What the serving issue targets, from the runs of one result (None where a run is missing)."""
    runs = result["runs"]
    settings = result["settings"]
    out: dict = {}
    on = _find(runs, system="tokensieve", workload="chat", concurrency=8, prefix_caching=True, scheduling="vtc", kind="load")
    off = _find(runs, system="tokensieve", workload="chat", concurrency=8, prefix_caching=False, kind="load")
    on_ttft = on["summary"]["ttft"]["mean"] if on and on["summary"]["ttft"] else None
    off_ttft = off["summary"]["ttft"]["mean"] if off and off["summary"]["ttft"] else None
    out["prefix_ttft_off_over_on"] = _ratio(off_ttft, on_ttft)
    workload = settings["workload"]
    c1 = _find(runs, system="tokensieve", workload=workload, concurrency=1, group="scaling")
    c8 = _find(runs, system="tokensieve", workload=workload, concurrency=8, group="scaling")
    out["c8_over_c1_token_throughput"] = _ratio(_throughput(c8), _throughput(c1))
    alone = _find(runs, group="fairness", kind="alone")
    for scheduling in ("vtc", "fcfs"):
        flood = _find(runs, group="fairness", kind="flood", scheduling=scheduling)
        flooded = flood["light_ttft"]["p99"] if flood and flood.get("light_ttft") else None
        alone_p99 = alone["light_ttft"]["p99"] if alone and alone.get("light_ttft") else None
        out[f"light_ttft_p99_flood_over_alone_{scheduling}"] = _ratio(flooded, alone_p99)
        out[f"jain_{scheduling}"] = flood["fairness"]["jain"] if flood else None
    llama = _find(runs, system="llama.cpp")
    ours = _find(runs, system="tokensieve", workload=llama["workload"], concurrency=llama["concurrency"],
                 prefix_caching=True, kind="load") if llama else None
    out["tokensieve_over_llamacpp_token_throughput"] = _ratio(_throughput(ours), _throughput(llama))
    return out


def ratio_lines(result: dict) -> list[str]:
    r = ratios(result)

    def fmt(value, unit="x"):
        return "-" if value is None else f"{value:.2f}{unit}"

    cut = r["prefix_ttft_off_over_on"]
    return [
        f"- prefix caching, chat at concurrency 8: mean TTFT off / on {fmt(cut)}"
        + (f" (a {100 * (1 - 1 / cut):.0f}% cut)" if cut else ""),
        f"- output token throughput, concurrency 8 / concurrency 1: {fmt(r['c8_over_c1_token_throughput'])}",
        f"- light clients' TTFT p99 flooded / alone: VTC {fmt(r['light_ttft_p99_flood_over_alone_vtc'])}, "
        f"FCFS {fmt(r['light_ttft_p99_flood_over_alone_fcfs'])}; Jain's index VTC {fmt(r['jain_vtc'], '')}, "
        f"FCFS {fmt(r['jain_fcfs'], '')}",
        f"- output token throughput, tokensieve / llama.cpp at the same concurrency: "
        f"{fmt(r['tokensieve_over_llamacpp_token_throughput'])}",
    ]


def _ms(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{1000 * stats['mean']:.0f} / {1000 * stats['p50']:.0f} / {1000 * stats['p99']:.0f}"


def _load(run: dict) -> str:
    if run.get("rate"):
        return f"{run['rate']:g}/s"
    return "+".join(str(c["concurrency"]) for c in run["clients"])


def run_line(run: dict) -> str:
    s = run["summary"]
    prefix = run.get("prefix_cache")
    hit = f"{prefix['hit_rate']:.2f}" if prefix and prefix.get("hit_rate") is not None else "-"
    caching = "-" if run["prefix_caching"] is None else ("on" if run["prefix_caching"] else "off")
    return (f"| {run['name']} | {run['system']} | {run['workload']} | {caching} | {run['scheduling'] or '-'} | {_load(run)} "
            f"| {s['completed']}/{s['requests']} | {s['request_throughput']:.2f} | {s['output_token_throughput']:.1f} "
            f"| {_ms(s['ttft'])} | {_ms(s['tpot'])} | {_ms(s['itl'])} | {hit} |")


RUN_HEADER = ("| run | system | workload | prefix cache | scheduling | concurrency | completed | req/s | out tok/s "
              "| TTFT ms mean / p50 / p99 | TPOT ms mean / p50 / p99 | ITL ms mean / p50 / p99 | prefix hit rate |\n"
              "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
FAIRNESS_HEADER = ("| run | scheduling | Jain's index | window s | heavy tokens | light tokens (each) "
                   "| light TTFT ms mean / p50 / p99 | light TTFT p99 / alone |\n|---|---|---:|---:|---:|---:|---:|---:|")


def fairness_line(run: dict, alone: dict | None) -> str:
    f = run.get("fairness")
    heavy = [u for u in run["users"] if u not in run["light_users"]]
    tokens = f["tokens_in_window"] if f else {}
    heavy_tokens = " + ".join(f"{tokens[u]:.0f}" for u in heavy) or "-"
    light_tokens = ", ".join(f"{tokens[u]:.0f}" for u in run["light_users"] if u in tokens) or "-"
    jain = f"{f['jain']:.3f}" if f and f["jain"] is not None else "-"
    window = f"{f['window_s']:.1f}" if f else "-"
    base = alone["light_ttft"]["p99"] if alone and alone.get("light_ttft") else None
    light = run.get("light_ttft")
    ratio = f"{light['p99'] / base:.2f}x" if light and base and run is not alone else "-"
    return (f"| {run['name']} | {run['scheduling']} | {jain} | {window} | {heavy_tokens} | {light_tokens} "
            f"| {_ms(light)} | {ratio} |")


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"Command: `{result['command']}`", "",
        f"{caption(result)}; {versions(result)}. "
        f"Streamed chat completions, greedy, at most {s['max_tokens']} new tokens; each run bounded by its "
        f"request count and a {s['timeout']:.0f} s timeout. Scaling runs: the {s['workload']} workload.", "",
    ]
    if result.get("skipped"):
        lines += [f"Skipped: {'; '.join(result['skipped'])}.", ""]
    lines += [RUN_HEADER, *map(run_line, result["runs"]), ""]
    fair = [r for r in result["runs"] if r["group"] == "fairness"]
    if fair:
        alone = next((r for r in fair if r["kind"] == "alone"), None)
        lines += ["Fairness: Jain's index of the tokens each client received while every client was still "
                  "sending (the window ends with the first client's last request).", "",
                  FAIRNESS_HEADER, *(fairness_line(r, alone) for r in fair), ""]
    lines += ratio_lines(result)
    return "\n".join(lines) + "\n"


SYSTEM_COLORS = {"tokensieve": "C0", "fairness": "C2", "llama.cpp": "C1"}


def _color(run: dict) -> str:
    if run["system"] == "llama.cpp":
        return SYSTEM_COLORS["llama.cpp"]
    return SYSTEM_COLORS["fairness"] if run["group"] == "fairness" else SYSTEM_COLORS["tokensieve"]


def write_plot(result: dict, path: Path) -> None:
    """Per run: mean TTFT (bar) with its p99 (tick), and output tokens/s; beside them, with fairness
    runs, the light clients' TTFT p99 alone and flooded under each scheduling."""
    from matplotlib.patches import Patch

    plt = pyplot()
    runs = result["runs"]
    fair = [r for r in runs if r["group"] == "fairness" and r.get("light_ttft")]
    widths = [3, 3] + ([1.4] if fair else [])
    fig, axes = plt.subplots(1, len(widths), figsize=(max(10, 1.1 * len(runs) + 5), 5.2), gridspec_kw={"width_ratios": widths})
    ttft_ax, tput_ax = axes[0], axes[1]
    xs = list(range(len(runs)))
    colors = [_color(r) for r in runs]
    means = [1000 * r["summary"]["ttft"]["mean"] if r["summary"]["ttft"] else 0 for r in runs]
    p99s = [1000 * r["summary"]["ttft"]["p99"] if r["summary"]["ttft"] else 0 for r in runs]
    ttft_ax.bar(xs, means, color=colors)
    ttft_ax.scatter(xs, p99s, marker="_", s=300, color="black", zorder=3)
    ttft_ax.set(ylabel="time to first token, ms (bar: mean, tick: p99)", title="TTFT")
    tput = [r["summary"]["output_token_throughput"] for r in runs]
    tput_ax.bar(xs, tput, color=colors)
    for x, value in zip(xs, tput):
        tput_ax.annotate(f"{value:.1f}" if value < 10 else f"{value:.0f}", (x, value), ha="center", va="bottom",
                         fontsize=7, xytext=(0, 1), textcoords="offset points")
    tput_ax.set(ylabel="output tokens/s (all requests)", title="throughput")
    for ax in (ttft_ax, tput_ax):
        ax.set_xticks(xs, [r["name"] for r in runs], rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    used = {c for c in colors}
    ttft_ax.legend(handles=[Patch(color=c, label=label) for label, c in
                            (("tokensieve", "C0"), ("tokensieve, fairness runs", "C2"), ("llama.cpp server", "C1")) if c in used],
                   fontsize=8)
    if fair:
        ax = axes[2]
        values = [1000 * r["light_ttft"]["p99"] for r in fair]
        ax.bar(range(len(fair)), values, color=["C7" if r["kind"] == "alone" else "C2" for r in fair])
        for x, value in enumerate(values):
            ax.annotate(f"{value:.0f}", (x, value), ha="center", va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
        ax.set_xticks(range(len(fair)), [r["name"] for r in fair], rotation=35, ha="right", fontsize=8)
        ax.set(ylabel="light clients' TTFT p99, ms", title="fairness")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"bench serve: {result['settings']['workload']} workload, at most {result['settings']['max_tokens']} new "
                 f"tokens, greedy\n{caption(result)}", fontsize=10)
    save(fig, path)
