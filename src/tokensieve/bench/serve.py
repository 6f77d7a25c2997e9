"""`tokensieve bench serve`: a load generator against OpenAI-compatible servers it starts itself
(`tokensieve serve` on a free port, with the same model options; llama-cpp-python's server on the
same GGUF file when `llama_cpp` is importable), or against a running server (`--url`).

One invocation runs, one server process after another:
- scaling: the workload at each fixed concurrency (default 1, 8, 32), or at Poisson arrival rates
  (`--request-rate`);
- prefix: the chat workload at concurrency 8 with the prefix cache on and off (a server each);
- fairness: one heavy client sending ten times the requests of each of several light clients, under
  `--scheduling vtc` and `--scheduling fcfs`, and the light clients alone;
- llamacpp: llama-cpp-python's server at concurrency 8 on the same workload.

Every run is bounded by its request count and a timeout. The per-request timings are in
serve_cases.jsonl; serve.json has every run's statistics and the run's provenance.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from .plotting import require_matplotlib
from .provenance import package_version, run_info
from .report import write_report
from .serve_load import Target, run_clients
from .serve_report import fairness, light_ttft, markdown, per_user, run_line, summarize_requests
from .serve_servers import (
    ServerProcess, free_port, llamacpp_command, prefix_counters, served_activations, served_model, tokensieve_command,
)
from .serve_workloads import ClientLoad, Conversation, conversations, system_prompt

DEFAULT_REQUESTS = 96
# llama-cpp-python samples with repeat_penalty 1.1 and min_p 0.05 unless told otherwise: plain greedy, as ours
LLAMACPP_GREEDY = {"repeat_penalty": 1.0, "min_p": 0.0, "top_p": 1.0}


def _prefix_delta(before, after) -> dict | None:
    if before is None or after is None:
        return None
    queries, hits = after[0] - before[0], after[1] - before[1]
    return {"queries": queries, "hits": hits, "hit_rate": hits / queries if queries else None}


def warm_up(target: Target, workload: str) -> None:
    """One short request, so that first-use costs (kernels, allocations) stay out of the first run; on the
    chat workload it carries the shared system prompt, so every run starts from a server in its steady state."""
    short = Target(target.base_url, target.model, max_tokens=8, api_key=target.api_key,
                   request_timeout=target.request_timeout, extra_body=target.extra_body)
    system = system_prompt() if workload == "chat" else None
    client = ClientLoad("warmup", [Conversation("warmup", ("Say hello.",), system)], concurrency=1)
    records, _ = asyncio.run(run_clients(short, [client], 300))
    if not records or not records[0].ok:
        raise ConfigError(f"the warm-up request to {target.base_url} failed: {records[0].error if records else 'not sent'}")


class Runner:
    """Holds the settings, writes each request to serve_cases.jsonl as runs end, collects the runs."""

    def __init__(self, args, cases_file):
        self.args, self.cases_file = args, cases_file
        self.runs: list[dict] = []
        self.records: dict[str, list[dict]] = {}

    def target(self, base_url: str, extra_body: dict | None = None) -> Target:
        model = served_model(base_url, self.args.api_key, self.args.model)
        return Target(base_url, model, max_tokens=self.args.max_tokens, api_key=self.args.api_key,
                      request_timeout=self.args.request_timeout, ignore_eos=self.args.ignore_eos,
                      extra_body=extra_body or {})

    def run(self, target: Target, spec: dict, clients: list[ClientLoad], *, counters: bool) -> dict:
        before = prefix_counters(target.base_url, target.api_key) if counters else None
        print(f"run {spec['name']}: {sum(len(t.turns) for c in clients for t in c.conversations)} requests from "
              f"{len(clients)} client(s)", flush=True)
        records, duration = asyncio.run(run_clients(target, clients, self.args.timeout))
        after = prefix_counters(target.base_url, target.api_key) if counters else None
        rows = [r.to_json() for r in records]
        for row in rows:
            self.cases_file.write(json.dumps({"run": spec["name"], **row}) + "\n")
        self.cases_file.flush()
        users = [c.user for c in clients]
        run = {
            **spec,
            "clients": [{"user": c.user, "concurrency": c.concurrency, "rate": c.rate,
                         "requests": sum(len(t.turns) for t in c.conversations)} for c in clients],
            "users": users,
            "summary": summarize_requests(rows, duration),
            "per_user": per_user(rows),
            "prefix_cache": _prefix_delta(before, after),
        }
        if spec["group"] == "fairness":
            run["light_ttft"] = light_ttft(run, rows)
            if spec["kind"] == "flood":
                run["fairness"] = fairness(rows, users)
        failed = [r for r in records if not r.ok]
        if failed:
            print(f"  {len(failed)} request(s) failed, e.g.: {failed[0].error}", flush=True)
        self.runs.append(run)
        print(run_line(run), flush=True)
        return run


def _spec(name: str, group: str, kind: str, system: str, workload: str, server: dict | None, **extra) -> dict:
    server = server or {}
    return {"name": name, "group": group, "kind": kind, "system": system, "workload": workload,
            "prefix_caching": server.get("prefix_caching"), "scheduling": server.get("scheduling"),
            "max_num_seqs": server.get("max_num_seqs"), "concurrency": None, "rate": None, **extra}


class Offsets:
    """Hands out conversation indices so that no two runs on one server send the same conversation
    (only the chat system prompt is shared)."""

    def __init__(self):
        self.next = 0

    def take(self, workload: str, requests: int) -> tuple[int, list]:
        start = self.next
        convs = conversations(workload, requests, start)
        self.next += len(convs)
        return start, convs


def requests_for(args, concurrency: int | None) -> int:
    """--requests, or by default 96 requests and at least 4 per conversation in flight (so that the
    ramp-up and the tail are a small part of a run)."""
    if args.requests:
        return args.requests
    return max(DEFAULT_REQUESTS, 4 * (concurrency or 0))


def _scaling_loads(args) -> list[tuple[str, int | None, float | None]]:
    if args.request_rate:
        return [(f"{args.workload} {rate:g}/s", args.max_concurrency, rate) for rate in args.request_rate]
    return [(f"{args.workload} c{n}", n, None) for n in args.concurrency]


def run_serve_benchmark(args) -> dict:
    require_matplotlib()
    if importlib.util.find_spec("httpx") is None:
        raise ConfigError("bench serve sends its requests with httpx: pip install 'tokensieve[bench]'")
    if not args.url and importlib.util.find_spec("tokensieve.server") is None:
        raise ConfigError("this tokensieve has no server (tokensieve.server) to benchmark; pass --url for a running one")
    info = run_info(args)
    info["threads"] = args.threads  # the server's threads; this process only sends requests
    info["httpx"] = package_version("httpx")
    info["llama_cpp_python"] = package_version("llama_cpp_python") or package_version("llama-cpp-python")
    runs = set(args.runs)
    skipped: list[str] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    servers = {
        "main": {"prefix_caching": True, "scheduling": "vtc", "max_num_seqs": args.max_num_seqs},
        "no_prefix": {"prefix_caching": False, "scheduling": "vtc", "max_num_seqs": args.max_num_seqs},
        "fair_vtc": {"prefix_caching": True, "scheduling": "vtc", "max_num_seqs": args.fairness_max_num_seqs},
        "fair_fcfs": {"prefix_caching": True, "scheduling": "fcfs", "max_num_seqs": args.fairness_max_num_seqs},
    }
    if args.url:
        dropped = sorted(runs - {"scaling"})
        if dropped:
            skipped.append(f"{', '.join(dropped)}: need servers this benchmark starts itself (not with --url)")
            print(f"skipping {skipped[-1]}", flush=True)
        runs &= {"scaling"}

    # plan: per server, the runs it serves, each with its clients
    plan: dict[str, list[tuple[dict, list[ClientLoad]]]] = {key: [] for key in servers}
    offsets = Offsets()
    main_runs = plan["main"]
    if "scaling" in runs:
        for name, concurrency, rate in _scaling_loads(args):
            _, convs = offsets.take(args.workload, requests_for(args, concurrency))
            spec = _spec(name, "scaling", "load", "tokensieve", args.workload, servers["main"],
                         concurrency=None if rate else concurrency, rate=rate)
            main_runs.append((spec, [ClientLoad("bench", convs, concurrency=concurrency, rate=rate, seed=args.seed)]))
    chat_c8 = next((s for s, _ in main_runs if s["workload"] == "chat" and s["concurrency"] == args.prefix_concurrency), None)
    if "prefix" in runs:
        if chat_c8 is None:
            _, convs = offsets.take("chat", requests_for(args, args.prefix_concurrency))
            chat_c8 = _spec(f"chat c{args.prefix_concurrency}", "prefix", "load", "tokensieve", "chat", servers["main"],
                            concurrency=args.prefix_concurrency)
            main_runs.append((chat_c8, [ClientLoad("bench", convs, concurrency=args.prefix_concurrency)]))
        convs = next(cl for s, cl in main_runs if s is chat_c8)[0].conversations
        spec = _spec(f"chat c{args.prefix_concurrency} no prefix cache", "prefix", "load", "tokensieve", "chat",
                     servers["no_prefix"], concurrency=args.prefix_concurrency)
        plan["no_prefix"].append((spec, [ClientLoad("bench", convs, concurrency=args.prefix_concurrency)]))
    if "fairness" in runs:
        light_users = [f"light-{i}" for i in range(args.fairness_light_clients)]
        alone = [ClientLoad(u, offsets.take(args.workload, args.fairness_light_requests)[1]) for u in light_users]
        flood = [ClientLoad(u, offsets.take(args.workload, args.fairness_light_requests)[1]) for u in light_users]
        heavy = ClientLoad("heavy", offsets.take(args.workload, args.fairness_ratio * args.fairness_light_requests)[1],
                           concurrency=args.fairness_heavy_concurrency)
        plan["fair_vtc"].append((_spec("light alone", "fairness", "alone", "tokensieve", args.workload, servers["fair_vtc"],
                                       light_users=light_users), alone))
        for key in ("fair_vtc", "fair_fcfs"):
            spec = _spec(f"flood {servers[key]['scheduling']}", "fairness", "flood", "tokensieve", args.workload,
                         servers[key], light_users=light_users)
            plan[key].append((spec, [heavy, *flood]))
    llama = None
    if "llamacpp" in runs:
        llama = _llamacpp_plan(args, main_runs, offsets, servers["main"], skipped)

    cases_path = out / "serve_cases.jsonl"
    started = time.perf_counter()
    with open(cases_path, "w") as cases:
        runner = Runner(args, cases)
        if args.url:
            target = runner.target(args.url.rstrip("/"))
            warm_up(target, args.workload)
            for spec, clients in main_runs:
                spec["system"] = "server at " + args.url
                runner.run(target, spec, clients, counters=True)
        else:
            for key, server in servers.items():
                if not plan[key]:
                    continue
                port = free_port()
                command = tokensieve_command(args, port, **server)
                with ServerProcess(f"tokensieve serve ({key})", command, port, "/health", args.startup_timeout) as proc:
                    target = runner.target(proc.base_url)
                    warm_up(target, args.workload)
                    info["activations"] = served_activations(proc.base_url, args.api_key, info["activations"])
                    for spec, clients in plan[key]:
                        runner.run(target, spec, clients, counters=True)
        if llama is not None:
            gguf, spec, clients = llama
            port = free_port()
            with ServerProcess("llama.cpp server", llamacpp_command(gguf, port, args.threads, args.llamacpp_n_ctx), port,
                               "/v1/models", args.startup_timeout) as proc:
                target = runner.target(proc.base_url, LLAMACPP_GREEDY)
                warm_up(target, args.workload)
                runner.run(target, spec, clients, counters=False)
    settings = {key: getattr(args, key) for key in (
        "workload", "requests", "concurrency", "request_rate", "max_concurrency", "max_tokens", "timeout", "max_num_seqs",
        "max_queue", "prefix_concurrency", "fairness_light_clients", "fairness_light_requests", "fairness_ratio",
        "fairness_heavy_concurrency", "fairness_max_num_seqs", "runs", "url", "ignore_eos", "seed")}
    result = info | {"settings": settings, "skipped": skipped, "wall_s": time.perf_counter() - started, "runs": runner.runs}
    write_report("serve", result, out)
    print(markdown(result))
    return result


def _llamacpp_plan(args, main_runs, offsets, main_server, skipped):
    """The llama.cpp run (the same conversations as our run at its concurrency), or None with the
    reason in `skipped`."""
    if args.url:
        return None
    if importlib.util.find_spec("llama_cpp") is None:
        skipped.append("llama.cpp: llama_cpp is not importable (pip install 'tokensieve[llamacpp]'; it builds from source)")
        print(f"skipping {skipped[-1]}", flush=True)
        return None
    from ..weights.loader import resolve_model_path

    gguf = resolve_model_path(args.model)
    if gguf.suffix != ".gguf":
        skipped.append(f"llama.cpp: the model {gguf} is not a GGUF file")
        print(f"skipping {skipped[-1]}", flush=True)
        return None
    n = args.llamacpp_concurrency
    ours = next((s for s, _ in main_runs if s["workload"] == args.workload and s["concurrency"] == n), None)
    if ours is None:
        _, convs = offsets.take(args.workload, requests_for(args, n))
        ours = _spec(f"{args.workload} c{n}", "llamacpp", "load", "tokensieve", args.workload, main_server, concurrency=n)
        main_runs.append((ours, [ClientLoad("bench", convs, concurrency=n)]))
    convs = next(cl for s, cl in main_runs if s is ours)[0].conversations
    spec = _spec(f"llama.cpp c{n}", "llamacpp", "load", "llama.cpp", args.workload, None, concurrency=n)
    return gguf, spec, [ClientLoad("bench", convs, concurrency=n)]


def main_from_args(args) -> None:
    """The parser's entry point (set by serve_parser)."""
    args.command_line = "tokensieve " + " ".join(sys.argv[1:])
    run_serve_benchmark(args)
