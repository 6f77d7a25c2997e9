"""`tokensieve bench embed`: sentence embeddings per second beside sentence-transformers (same weights,
threads and texts, in this process), and what each token-merging setting costs in fidelity against
the unmerged model on the same texts."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..embedder import Embedder, resolve_encoder_path
from ..errors import ConfigError
from ..merging import MergingConfig
from .cpu import spec_bench_texts
from .embed_report import result_line
from .plotting import require_matplotlib
from .provenance import package_version, run_info
from .report import write_report

NEIGHBOURS = 10


def corpus_texts(embedder: Embedder, length: int, count: int) -> list[str]:
    """`count` texts of about `length` tokens ([CLS] and [SEP] included): Spec-Bench's questions and
    articles one after another, cut into pieces of length - 2 word pieces and decoded."""
    ids = [i for text in spec_bench_texts() for i in embedder.tokenize([text])[0][1:-1]]
    piece = length - 2
    if piece < 1 or len(ids) < piece * count:
        raise ConfigError(f"Spec-Bench holds {len(ids)} word pieces: too few for {count} texts of {length} tokens")
    return [embedder.tokenizer.decode(ids[i * piece:(i + 1) * piece]) for i in range(count)]


def fidelity(vectors: torch.Tensor, reference: torch.Tensor) -> dict:
    """Mean cosine to the reference vectors, the overlap of each text's 10 nearest neighbours, and the
    Spearman correlation of all pairwise similarities."""
    vectors, reference = F.normalize(vectors, dim=-1), F.normalize(reference, dim=-1)
    similarity, reference_similarity = vectors @ vectors.T, reference @ reference.T
    eye = torch.eye(len(vectors), dtype=torch.bool)
    k = min(NEIGHBOURS, len(vectors) - 1)
    ours = similarity.masked_fill(eye, float("-inf")).topk(k).indices
    theirs = reference_similarity.masked_fill(eye, float("-inf")).topk(k).indices
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ours, theirs)) / (k * len(vectors))
    pairs = torch.triu_indices(len(vectors), len(vectors), 1)
    ranked = [values[pairs[0], pairs[1]].argsort().argsort().double() for values in (similarity, reference_similarity)]
    spearman = torch.corrcoef(torch.stack(ranked))[0, 1].item()
    return {"cosine": F.cosine_similarity(vectors, reference).mean().item(), "neighbour_overlap": overlap,
            "spearman": spearman}


def _settings(args) -> list[MergingConfig]:
    return [MergingConfig(method, ratio, args.start_layer, schedule, metric, proportional == "on")
            for method in args.methods for metric in args.metrics for proportional in args.proportional
            for schedule in args.schedules for ratio in args.ratios]


def _label(config: MergingConfig | None) -> str:
    if config is None:
        return "unmerged"
    details = [f" from {config.start_layer}" if config.start_layer else "",
               " on keys" if config.metric == "keys" else "", "" if config.proportional_attention else " no prop-attn"]
    return f"{config.method} {config.ratio:g} {config.schedule}" + "".join(details)


def run_embed_benchmark(args) -> dict:
    require_matplotlib()
    torch.set_num_threads(args.threads)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ConfigError("bench embed runs sentence-transformers beside us: pip install sentence-transformers") from None
    settings = _settings(args)  # settings errors before anything loads
    info = run_info(args) | {"sentence_transformers": package_version("sentence-transformers")}
    embedder = Embedder(args.model)
    reference = SentenceTransformer(str(resolve_encoder_path(args.model)), device="cpu")
    systems = {"sentence-transformers": lambda texts: reference.encode(texts, batch_size=args.batch_size, convert_to_tensor=True)}
    for config in [None, *settings]:
        variant = embedder.with_merging(config)
        systems[_label(config)] = lambda texts, variant=variant: variant.encode(texts, args.batch_size, convert_to_tensor=True)
    result = info | {"texts": args.texts, "batch_size": args.batch_size, "repeats": args.repeats, "rows": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{args.model}, {info['threads']} threads, {info['machine']}: {args.texts} texts, batch {args.batch_size}, "
          f"median of {args.repeats} interleaved runs")
    with open(out / "embed_cases.jsonl", "w") as cases:
        for length in args.lengths:
            texts = corpus_texts(embedder, length, args.texts)
            vectors = {name: encode(texts) for name, encode in systems.items()}  # also the warm-up
            seconds: dict[str, list[float]] = {name: [] for name in systems}
            for _ in range(args.repeats):
                for name, encode in systems.items():
                    start = time.perf_counter()
                    encode(texts)
                    seconds[name].append(time.perf_counter() - start)
            baseline = statistics.median(seconds["sentence-transformers"])
            unmerged = statistics.median(seconds["unmerged"])
            for name in systems:
                median = statistics.median(seconds[name])
                row = {"length": length, "system": name, "texts_per_s": args.texts / median,
                       "vs_sentence_transformers": baseline / median, "vs_unmerged": unmerged / median,
                       "runs_s": seconds[name], **fidelity(vectors[name], vectors["unmerged"]),
                       "cosine_to_sentence_transformers": F.cosine_similarity(
                           vectors[name], vectors["sentence-transformers"]).mean().item()}
                result["rows"].append(row)
                cases.write(json.dumps(row) + "\n")
                cases.flush()
                print(result_line(row), flush=True)
    write_report("embed", result, out)
    print((out / "embed.md").read_text())
    return result
