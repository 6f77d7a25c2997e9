"""Read a Hugging Face model folder: config.json plus one or more .safetensors files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..models.config import ModelConfig


def read_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder} has no config.json; expected a Hugging Face model folder or a .gguf file")
    try:
        cfg = ModelConfig.from_hf_dict(json.loads(config_file.read_text()))
    except (json.JSONDecodeError, KeyError) as exc:
        raise ModelLoadError(f"{config_file} is not a valid model config: {exc}") from exc
    return cfg, read_safetensors(folder)


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's .safetensors files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"could not read weights file {file}: {exc}") from exc
    return state
