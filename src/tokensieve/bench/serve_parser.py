"""Command-line options of `tokensieve bench serve`."""

from __future__ import annotations

from .serve_workloads import WORKLOADS

RUN_GROUPS = ("scaling", "prefix", "fairness", "llamacpp")


def _run_serve(args) -> None:
    from .serve import main_from_args

    main_from_args(args)


def add_serve_parser(bench_sub, add_model_options) -> None:
    parser = bench_sub.add_parser(
        "serve", help="a serving load test: TTFT, TPOT, ITL, throughput, prefix cache hits and fairness over HTTP")
    add_model_options(parser)
    parser.add_argument("--url", default=None,
                        help="benchmark a running server (http://host:port) instead of starting tokensieve serve; "
                             "only the scaling runs then")
    parser.add_argument("--api-key", default=None, help="bearer key for --url")
    parser.add_argument("--workload", default="chat", choices=WORKLOADS,
                        help="prompts of the scaling, fairness and llama.cpp runs (the prefix runs are always chat)")
    parser.add_argument("--runs", nargs="+", default=list(RUN_GROUPS), choices=RUN_GROUPS, help="which runs to do")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests of each scaling, prefix and llama.cpp run (default: 96, or 4 per "
                             "conversation in flight when that is more)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                        help="fixed concurrency levels of the scaling runs (conversations in flight)")
    parser.add_argument("--request-rate", type=float, nargs="+", default=None,
                        help="Poisson arrivals instead: conversations started per second, one scaling run per rate")
    parser.add_argument("--max-concurrency", type=int, default=None, help="cap on conversations in flight with --request-rate")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request, at most")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens (tokensieve only)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds each run may take; unfinished requests count as failed")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds a server may take to load")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="the server's batch of running sequences")
    parser.add_argument("--max-queue", type=int, default=256, help="the server's queue of waiting requests")
    parser.add_argument("--prefix-concurrency", type=int, default=8, help="concurrency of the prefix cache on/off runs")
    parser.add_argument("--fairness-light-clients", type=int, default=3)
    parser.add_argument("--fairness-light-requests", type=int, default=8, help="requests of each light client")
    parser.add_argument("--fairness-ratio", type=int, default=10, help="the heavy client sends this many times a light one's requests")
    parser.add_argument("--fairness-heavy-concurrency", type=int, default=10)
    parser.add_argument("--fairness-max-num-seqs", type=int, default=4,
                        help="the fairness servers' batch: smaller than the clients' concurrency, so that requests queue")
    parser.add_argument("--llamacpp-concurrency", type=int, default=8)
    parser.add_argument("--llamacpp-n-ctx", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0, help="Poisson arrivals' seed")
    parser.add_argument("--out", default="benchmarks/serve",
                        help="folder for serve.json, serve_cases.jsonl, serve.md and serve.png")
    parser.set_defaults(threads=2, func=_run_serve)
