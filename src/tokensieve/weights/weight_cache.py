"""Weights read from a GGUF file, kept on disk in the form the engine runs them, so that the next start
maps them (torch.load with mmap: no copy, pages read as they are touched) instead of parsing the file,
dequantizing and repacking (seconds).

An entry is keyed by the GGUF file's content hash and by the code that lays the weights out (the
loader, the block layouts and the kernels that read them, torch's version): a changed file or a changed
layout is simply another entry. One entry per form: "int8" (GGUF blocks repacked for the int8 kernel,
no float32 copy of what they hold), "float32" (dense weights and the blocks) or "dense" (no kernels).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..cache import cache_root
from ..models.config import ModelConfig
from ..models.int8_weight import Int8Weight
from ..models.quantized import QuantizedWeight

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).parent.parent
# the code whose change changes what an entry holds or how it is read
LAYOUT_SOURCES = (
    "weights/gguf_file.py", "weights/loader.py", "weights/weight_cache.py", "models/quantized.py", "models/int8_weight.py",
    "kernels/qmatmul.cpp", "kernels/int8_matmul.cpp",
)
NATIVE_TYPES = {"QuantizedWeight": QuantizedWeight, "Int8Weight": Int8Weight}


@dataclass
class LoadedWeights:
    """What load_model builds a model from: float32 tensors under our module names, and the GGUF blocks
    (QuantizedWeight or Int8Weight) of the modules that multiply or read them natively."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    natives: dict[str, QuantizedWeight | Int8Weight] = field(default_factory=dict)
    activations: str = "float32"  # what the model runs: "int8" or "float32"
    has_blocks: bool = False  # whether the file has blocks the int8 kernel multiplies


def file_digest(path: Path) -> str:
    """sha1 of the file's bytes (about 0.07 s for 100 MB)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _layout_version() -> str:
    digest = hashlib.sha1(torch.__version__.encode())
    for name in LAYOUT_SOURCES:
        digest.update((PACKAGE_DIR / name).read_bytes())
    return digest.hexdigest()[:12]


class WeightCache:
    """The cached forms of one GGUF file, in $TOKENSIEVE_CACHE/weights/<content hash>-<layout version>/."""

    def __init__(self, gguf_path: Path):
        self.content = file_digest(gguf_path)[:20]
        self.folder = cache_root() / "weights" / f"{self.content}-{_layout_version()}"

    def load(self, form: str) -> LoadedWeights | None:
        """The entry of this form, memory-mapped; None when there is none or it cannot be read."""
        path = self.folder / f"{form}.pt"
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, mmap=True, weights_only=True)
            natives = {name: NATIVE_TYPES[kind](**fields) for name, (kind, fields) in saved["natives"].items()}
            config = ModelConfig(**json.loads(saved["config"]))
            return LoadedWeights(config, saved["state"], natives, saved["activations"], saved["has_blocks"])
        except Exception as exc:  # a truncated or foreign file: build it again
            log.warning("ignoring the unreadable cached weights %s (%s)", path, exc)
            return None

    def save(self, form: str, weights: LoadedWeights) -> None:
        """Write the entry atomically (a reader never sees half a file); a read-only cache is not an error."""
        saved = {
            "config": json.dumps(asdict(weights.config)),
            "state": weights.state,
            "natives": {name: (type(w).__name__, vars(w)) for name, w in weights.natives.items()},
            "activations": weights.activations,
            "has_blocks": weights.has_blocks,
        }
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".tmp", delete=False) as tmp:
                torch.save(saved, tmp)
            os.replace(tmp.name, self.folder / f"{form}.pt")
            for stale in self.folder.parent.glob(f"{self.content}-*"):  # the same file in an older layout
                if stale != self.folder:
                    shutil.rmtree(stale, ignore_errors=True)
        except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
            if tmp is not None:
                Path(tmp.name).unlink(missing_ok=True)
            log.warning("could not cache the loaded weights in %s (%s); the next start reads the GGUF file again",
                        self.folder, exc)
