"""Read a sentence-transformers folder (modules.json: Transformer -> Pooling -> Normalize) or a plain
BERT folder (config.json + .safetensors, pooled by the mean as sentence-transformers does)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..models.bert import BertConfig
from .hf_folder import read_safetensors

POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "lasttoken")
MODULE_TYPES = {
    "sentence_transformers.models.Transformer": "transformer",
    "sentence_transformers.models.Pooling": "pooling",
    "sentence_transformers.models.Normalize": "normalize",
}


@dataclass(frozen=True)
class EncoderFolder:
    config: BertConfig
    state: dict[str, torch.Tensor]
    tokenizer_folder: Path
    pooling: str  # one of POOLING_MODES
    normalize: bool
    max_seq_length: int
    do_lower_case: bool


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"could not read {file}: {exc}") from exc


def _pooling_mode(file: Path) -> str:
    settings = _read_json(file)
    modes = [mode for mode in POOLING_MODES if settings.get(f"pooling_mode_{mode}")]
    if len(modes) != 1:
        raise ModelLoadError(f"{file} asks for pooling {modes or 'none'}; tokensieve pools by exactly one of {POOLING_MODES}")
    return modes[0]


def read_encoder_folder(folder: Path) -> EncoderFolder:
    """The BERT weights, tokenizer folder and pooling of a sentence-transformers or BERT folder."""
    modules_file = folder / "modules.json"
    transformer_dir, pooling, normalize = folder, "mean_tokens", False
    if modules_file.is_file():
        modules = _read_json(modules_file)
        kinds = [MODULE_TYPES.get(module.get("type")) for module in modules]
        if None in kinds or kinds[:1] != ["transformer"]:
            unknown = [m.get("type") for m, kind in zip(modules, kinds) if kind is None]
            raise ModelLoadError(
                f"{modules_file}: tokensieve runs Transformer -> Pooling -> Normalize pipelines; "
                f"unsupported modules: {unknown or 'the first module is not a Transformer'}"
            )
        paths = {kind: folder / module.get("path", "") for kind, module in zip(kinds, modules)}
        transformer_dir = paths["transformer"]
        if "pooling" in paths:
            pooling = _pooling_mode(paths["pooling"] / "config.json")
        normalize = "normalize" in paths
    config_file = transformer_dir / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{transformer_dir} has no config.json; expected a sentence-transformers or BERT folder")
    try:
        config = BertConfig.from_hf_dict(_read_json(config_file))
    except KeyError as exc:
        raise ModelLoadError(f"{config_file} is not a valid BERT config: it lacks {exc.args[0]!r}") from exc
    settings_file = transformer_dir / "sentence_bert_config.json"
    settings = _read_json(settings_file) if settings_file.is_file() else {}
    return EncoderFolder(
        config=config,
        state=read_safetensors(transformer_dir),
        tokenizer_folder=transformer_dir,
        pooling=pooling,
        normalize=normalize,
        max_seq_length=min(settings.get("max_seq_length") or config.max_position_embeddings, config.max_position_embeddings),
        do_lower_case=bool(settings.get("do_lower_case", False)),
    )
