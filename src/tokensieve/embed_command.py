"""`tokensieve embed`: sentence embeddings of texts given as arguments or read from a file, written as
a .npy array or as JSON lines."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import RequestError
from .merging.config import METHODS, SCHEDULES
from .weights.packaged import DEFAULT_ENCODER

OUTPUT_SUFFIXES = (".npy", ".jsonl")


def add_embed_command(sub) -> None:
    embed = sub.add_parser("embed", help="sentence embeddings of texts (an encoder such as all-MiniLM-L6-v2)")
    embed.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (or use --file)")
    embed.add_argument("--file", default=None,
                       help="one text per line, blank lines skipped ('-': stdin); a .jsonl file holds on each line "
                            "a JSON string or an object with a \"text\" field")
    embed.add_argument("--out", default=None,
                       help="x.npy: a float32 array [texts, dimension]; x.jsonl: one {\"index\", \"text\", \"embedding\"} "
                            "object per line (default: JSON lines on stdout)")
    embed.add_argument("--model", default=DEFAULT_ENCODER, help="packaged alias or sentence-transformers / BERT folder")
    embed.add_argument("--merging", default=None, choices=METHODS, help="merge tokens between the encoder's layers")
    embed.add_argument("--merging-ratio", type=float, default=0.5, help="share of each text's tokens removed by the last layer")
    embed.add_argument("--merging-schedule", default="constant", choices=SCHEDULES)
    embed.add_argument("--batch-size", type=int, default=32)
    embed.add_argument("--normalize", action="store_true", help="scale each vector to length 1")
    embed.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    embed.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    embed.set_defaults(func=cmd_embed)


def cmd_embed(args: argparse.Namespace) -> None:
    """Check the texts and the output before loading the model; then embed and write."""
    import torch

    from .embedder import Embedder
    from .merging import MergingConfig

    out = Path(args.out) if args.out else None
    if out is not None and out.suffix not in OUTPUT_SUFFIXES:
        raise RequestError(f"--out must end in {' or '.join(OUTPUT_SUFFIXES)}, got {args.out!r}")
    if out is not None and not out.parent.is_dir():
        raise RequestError(f"--out: the folder {str(out.parent)!r} does not exist")
    texts = _texts(args)
    merging = MergingConfig(args.merging, args.merging_ratio, schedule=args.merging_schedule) if args.merging else None
    if args.threads:
        torch.set_num_threads(args.threads)
    embedder = Embedder(args.model, merging=merging)
    vectors = embedder.encode(texts, batch_size=args.batch_size, normalize_embeddings=args.normalize,
                              show_progress_bar=not args.no_progress)
    if out is not None and out.suffix == ".npy":
        import numpy as np

        np.save(out, vectors)  # float32, as encode gives it
    elif out is not None:
        with out.open("w", encoding="utf-8") as file:
            _write_jsonl(file, texts, vectors)
    else:
        _write_jsonl(sys.stdout, texts, vectors)


def _texts(args: argparse.Namespace) -> list[str]:
    if args.texts and args.file:
        raise RequestError("give texts as arguments or with --file, not both")
    texts = _read_texts(args.file) if args.file else list(args.texts)
    if not texts:
        raise RequestError("no texts to embed: give them as arguments or with --file")
    return texts


def _read_texts(path: str) -> list[str]:
    """The non-blank lines of a file or of stdin ('-'); of a .jsonl file, each line's string or "text" field."""
    if path == "-":
        lines = sys.stdin.read().splitlines()
    else:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise RequestError(f"cannot read --file {path!r}: {exc.strerror}") from None
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if not path.endswith(".jsonl"):
        return [line for _, line in numbered]
    return [_jsonl_text(path, number, line) for number, line in numbered]


def _jsonl_text(path: str, number: int, line: str) -> str:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RequestError(f"{path} line {number} is not JSON: {exc.msg}") from None
    if isinstance(item, dict):
        item = item.get("text")
    if not isinstance(item, str):
        raise RequestError(f"{path} line {number} must be a JSON string or an object with a \"text\" string")
    return item


def _write_jsonl(file, texts: list[str], vectors) -> None:
    for index, (text, vector) in enumerate(zip(texts, vectors)):
        file.write(json.dumps({"index": index, "text": text, "embedding": vector.tolist()}) + "\n")
