"""Command-line options of `tokensieve bench longctx`."""

from __future__ import annotations

from ..config import QUANTIZED_KV_BITS
from ..policies import ALLOCATIONS, POLICIES
from .longctx_systems import KVPRESSES
from .longctx_tasks import TASKS


def add_longctx_parser(bench_sub, add_model_options) -> None:
    parser = bench_sub.add_parser("longctx", help="KV policies on long-context tasks beside transformers and kvpress")
    add_model_options(parser)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="prompt tokens")
    parser.add_argument("--cases", type=int, default=30, help="cases per task and length")
    parser.add_argument("--policies", nargs="*", default=[p for p in POLICIES if p != "full"], choices=list(POLICIES))
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=[0.25, 0.5], help="share of the context kept")
    parser.add_argument("--allocation", default="uniform", choices=ALLOCATIONS)
    parser.add_argument("--merge-above", type=float, default=None,
                        help="also run each policy with merge on evict at this key cosine (D2O; -1: every evicted entry, EMS)")
    parser.add_argument("--retrieval-heads", type=float, default=None,
                        help="also run each policy with this share of probed retrieval heads keeping everything (RazorAttention)")
    parser.add_argument("--selections", type=float, nargs="*", default=[0.125],
                        help="block selection (Quest) over the full cache, attending this share of the entries")
    parser.add_argument("--shortlists", type=int, nargs="*", default=[],
                        help="also run each selection with the key bounds shortlisting this many times its blocks")
    parser.add_argument("--kv-dtypes", nargs="*", default=list(QUANTIZED_KV_BITS), choices=list(QUANTIZED_KV_BITS),
                        help="quantized KV pools run beside the engine's --kv-dtype: the full cache in each, and each of "
                             "--quantized-policies at each keep ratio")
    parser.add_argument("--quantized-policies", nargs="*", default=[], choices=list(POLICIES),
                        help="policies also run over the --kv-dtypes pools (eviction and quantization together), "
                             "with the --merge-above and --retrieval-heads variants too")
    parser.add_argument("--presses", nargs="*", default=KVPRESSES, choices=KVPRESSES,
                        help="kvpress presses to run beside ours (when kvpress is installed)")
    parser.add_argument("--query-aware", action="store_true",
                        help="compress after the question is seen (default: query-agnostic, the question comes after)")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers and kvpress")
    parser.add_argument("--prefill-chunk-size", type=int, default=2048,
                        help="our engine compresses after every chunk: peak KV is the budget plus one chunk")
    parser.add_argument("--kv-cache-bytes", type=int, default=2 * 1024**3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/longctx", help="folder for longctx.json, .md and .png")
    parser.set_defaults(threads=2)
