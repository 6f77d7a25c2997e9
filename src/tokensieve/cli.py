"""Command line: `tokensieve generate | chat | serve | embed | bench`."""

from __future__ import annotations

import argparse
import sys
import time

from .bench.commands import benchmark_command
from .bench.longctx_parser import add_longctx_parser
from .embed_command import add_embed_command
from .errors import TokensieveError
from .weights.packaged import DEFAULT_MODEL


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="packaged alias, .gguf file or Hugging Face folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--activations", default="auto", choices=["auto", "int8", "float32"],
                        help="int8: round what enters a Q4/Q8 matmul to int8 per 32 values (faster, ~0.1-1%% error per "
                             "matmul); float32: the reference mode; auto (default): int8 where it applies")
    parser.add_argument("--kv-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16", "int8", "int4"],
                        help="what the KV cache stores (auto: float16 with int8 activations, else the model's dtype; "
                             "int8, int4: quantized blocks, KIVI)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--stats", action="store_true", help="print token counts and tokens/s")


def _add_kv_policy_options(parser: argparse.ArgumentParser) -> None:
    from .policies import ALLOCATIONS, POLICIES

    parser.add_argument("--kv-policy", default="full", choices=list(POLICIES), help="KV-cache eviction policy")
    parser.add_argument("--kv-budget", type=int, default=None, help="entries kept per layer and KV head")
    parser.add_argument("--kv-keep-ratio", type=float, default=None, help="or: share of the processed tokens kept")
    parser.add_argument("--kv-allocation", default="uniform", choices=ALLOCATIONS)
    parser.add_argument("--kv-decode-interval", type=int, default=None, help="also compress every N decode steps")
    parser.add_argument("--kv-merge-above", type=float, default=None,
                        help="merge an evicted entry into its most similar kept one at this key cosine or above (D2O; -1: all)")
    parser.add_argument("--kv-retrieval-heads", type=float, default=None,
                        help="this share of the heads, found by a probe, keep every entry (RazorAttention, DuoAttention)")
    parser.add_argument("--kv-select-ratio", type=float, default=None,
                        help="block selection (Quest): decoding attends to this share of the entries, all kept")
    parser.add_argument("--kv-select-shortlist", type=int, default=None,
                        help="with --kv-select-ratio: the key bounds shortlist this many times the blocks, exact scores choose")


def _add_speculative_options(parser: argparse.ArgumentParser) -> None:
    from .config import DEFAULT_DRAFTERS, DRAFTERS

    parser.add_argument("--speculative", action="store_true", help="model-free speculative decoding (lossless)")
    parser.add_argument(
        "--drafters", default=",".join(DEFAULT_DRAFTERS), help=f"comma-separated, of: {', '.join(DRAFTERS)}"
    )
    parser.add_argument("--max-draft-nodes", type=int, default=None,
                        help="drafted tokens per forward, at most (default: 32 on a CPU, 96 on a GPU)")


def _speculative(args):
    from .config import SpeculativeConfig

    if not args.speculative:
        return None
    return SpeculativeConfig(drafters=args.drafters, max_nodes=args.max_draft_nodes)


def _kv_policy(args):
    from .config import KVPolicyConfig

    return KVPolicyConfig(
        args.kv_policy, budget=args.kv_budget, keep_ratio=args.kv_keep_ratio, allocation=args.kv_allocation,
        decode_interval=args.kv_decode_interval, merge_above=args.kv_merge_above, retrieval_heads=args.kv_retrieval_heads,
    )


def _kv_selection(args):
    from .config import KVSelectionConfig

    if args.kv_select_ratio is None:
        return None
    return KVSelectionConfig(ratio=args.kv_select_ratio, shortlist=args.kv_select_shortlist)


def _sampling_params(args):
    from .sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
    )


def _load(args, **engine_options):
    import torch

    from .llm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    return LLM(args.model, dtype=args.dtype, device=args.device, activations=args.activations, kv_dtype=args.kv_dtype,
               kv_policy=_kv_policy(args), kv_selection=_kv_selection(args), speculative=_speculative(args),
               **engine_options)


def _stream(llm, prompt, params, show_stats: bool) -> str:
    """Print the answer as it comes; return its text."""
    started = time.perf_counter()
    final = None
    for out in llm.stream(prompt, params):
        print(out.delta_text, end="", flush=True)
        final = out
    print()
    if show_stats and final is not None:
        m = final.metrics
        prefill_rate = final.num_prompt_tokens / m.time_to_first_token if m.time_to_first_token else 0.0
        from .bench.cpu_llamacpp import peak_rss_bytes  # a module without imports of its own

        engine = llm.engine.stats()
        print(
            f"[{final.num_prompt_tokens} prompt tokens, {final.num_generated_tokens} generated, "
            f"finish={final.finish_reason}; prefill {prefill_rate:.1f} tok/s, "
            f"decode {m.decode_tokens_per_second or 0.0:.1f} tok/s, total {time.perf_counter() - started:.2f} s; "
            f"{engine['activations']} activations, {engine['kv_dtype']} KV; "
            f"peak memory {peak_rss_bytes() / 1024**2:.0f} MB]",
            file=sys.stderr,
        )
    return final.text if final else ""


def cmd_generate(args) -> None:
    llm = _load(args)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    _stream(llm, prompt, _sampling_params(args), args.stats)


def cmd_chat(args) -> None:
    llm = _load(args)
    params = _sampling_params(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("tokensieve chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        try:
            answer = _stream(llm, history, params, args.stats)
        except TokensieveError as exc:
            history.pop()
            print(f"error: {exc}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": answer})


def _add_serve_command(sub) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, ...)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (or set TOKENSIEVE_API_KEY)")
    serve.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    serve.add_argument("--max-num-seqs", type=int, default=16, help="requests running at once")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting, at most (then 503)")
    serve.add_argument("--no-prefix-caching", action="store_true", help="do not share KV blocks of common prefixes")
    serve.add_argument("--scheduling", default="vtc", choices=["vtc", "fcfs"],
                       help="vtc: fair between clients (API key or `user`); fcfs: first come, first served")
    serve.add_argument("--embedding-model", default=None,
                       help="also serve this encoder at /v1/embeddings, under this name (packaged alias such as "
                            "all-minilm-l6-v2, or a sentence-transformers / BERT folder)")
    _add_model_options(serve)
    _add_kv_policy_options(serve)
    _add_speculative_options(serve)
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args) -> None:
    """Start answering at once (/health says 503 while loading); load the model in the background."""
    import os

    import uvicorn

    from .server import create_app

    def stop_on_failure(load):
        def run():
            try:
                return load()
            except BaseException:
                server.should_exit = True  # the error is reported once uvicorn has stopped
                raise
        return run

    def load():
        llm = _load(args, max_num_seqs=args.max_num_seqs, prefix_caching=not args.no_prefix_caching,
                    scheduling=args.scheduling)
        print(f"tokensieve: {args.model} is ready at http://{args.host}:{args.port}/v1", file=sys.stderr)
        return llm

    def load_embedder():
        from .embedder import Embedder

        return Embedder(args.embedding_model, device=args.device)

    app = create_app(
        stop_on_failure(load), served_model_name=args.served_model_name or args.model,
        api_key=args.api_key or os.environ.get("TOKENSIEVE_API_KEY"), max_queue=args.max_queue,
        embedder=stop_on_failure(load_embedder) if args.embedding_model else None,
    )
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port))
    server.run()
    if app.state.server.load_error is not None:
        raise app.state.server.load_error


def cmd_report(args) -> None:
    from .bench.report import rewrite_report

    for path in rewrite_report(args.folder):
        print(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokensieve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt, streaming the text")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    _add_model_options(gen)
    _add_sampling_options(gen)
    _add_kv_policy_options(gen)
    _add_speculative_options(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with the model's chat template")
    chat.add_argument("--system", default=None, help="system message")
    _add_model_options(chat)
    _add_sampling_options(chat)
    _add_kv_policy_options(chat)
    _add_speculative_options(chat)
    chat.set_defaults(func=cmd_chat)

    _add_serve_command(sub)
    add_embed_command(sub)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    speed = bench_sub.add_parser("speed", help="prefill and decode tokens/s beside transformers")
    _add_model_options(speed)
    from .bench.model_shapes import SHAPES

    speed.add_argument("--shape", default=None, help=f"measure random weights of a model's shape instead of --model "
                                                     f"({', '.join(SHAPES)}; SmolLM2's vocabulary)")
    speed.add_argument("--static-decode", default="auto", choices=["auto", "on", "off"],
                       help="decode steps from static device buffers (CUDA graphs on CUDA); auto: on for CUDA only")
    speed.add_argument("--bandwidth-gbs", type=float, default=4800.0,
                       help="the GPU's memory bandwidth that decode steps' reads are measured against (H200: 4800)")
    speed.add_argument("--prefill-lengths", type=int, nargs="+", default=[512, 2048])
    speed.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    speed.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    speed.add_argument("--decode-tokens", type=int, default=32)
    speed.add_argument("--repeats", type=int, default=2)
    speed.add_argument("--kv-cache-bytes", type=int, default=4 * 1024**3)
    speed.add_argument("--no-native-kernels", dest="native_kernels", action="store_false",
                       help="plain PyTorch only (to measure what the C++ kernels bring)")
    speed.add_argument("--out", default="benchmarks/speed", help="folder for speed.json, speed_cases.jsonl, speed.md and speed.png")
    speed.set_defaults(func=benchmark_command("tokensieve.bench.speed", "run_speed_benchmark"), threads=2)
    add_longctx_parser(bench_sub, _add_model_options)
    longctx = benchmark_command("tokensieve.bench.longctx", "run_longctx_benchmark")
    bench_sub.choices["longctx"].set_defaults(func=longctx)
    from .bench.cpu_parser import add_cpu_parser
    from .bench.embed_parser import add_embed_parser
    from .bench.serve_parser import add_serve_parser

    add_serve_parser(bench_sub, _add_model_options)  # `bench serve` runs through its own func
    add_cpu_parser(bench_sub)  # and `bench cpu` through its own
    add_embed_parser(bench_sub)
    spec = bench_sub.add_parser("spec", help="speculative decoding on Spec-Bench beside plain decoding and HF prompt lookup")
    _add_model_options(spec)
    from .bench.spec import QUESTIONS
    from .config import DEFAULT_DRAFTERS, DRAFTERS

    spec.add_argument("--questions", default=str(QUESTIONS), help="Spec-Bench question.jsonl")
    spec.add_argument("--per-category", type=int, default=10, help="prompts per category (the first ones)")
    spec.add_argument("--max-tokens", type=int, default=256)
    spec.add_argument("--drafters", default=",".join(DEFAULT_DRAFTERS), help=f"comma-separated, of: {', '.join(DRAFTERS)}")
    spec.add_argument("--max-nodes", type=int, default=None, help="drafted tokens per forward, at most (default: the device's)")
    spec.add_argument("--hf-lookup-tokens", type=int, default=10, help="transformers' prompt_lookup_num_tokens")
    spec.add_argument("--no-transformers", action="store_true", help="skip transformers generate")
    spec.add_argument("--out", default="benchmarks/spec", help="folder for spec.json, spec_cases.jsonl, spec.md and spec.png")
    spec.set_defaults(func=benchmark_command("tokensieve.bench.spec", "run_spec_benchmark"), threads=2)
    report = bench_sub.add_parser("report", help="write a recorded run's Markdown table and plot again from its JSON")
    report.add_argument("folder", help="a benchmark's output folder (holding its speed, spec, longctx, serve or cpu .json)")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TokensieveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
