"""Read a GGUF file into a ModelConfig and Hugging-Face-named float tensors (dequantized by `gguf`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError
from ..models.config import ModelConfig
from ..models.quantized import BLOCK_LAYOUTS, QuantizedWeight

# GGUF architecture name -> our architecture name
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}

GGUF_TO_HF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _open(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the gguf package raises assorted errors on a damaged file
        raise ModelLoadError(f"could not read GGUF file {path}: {exc}") from exc


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_gguf_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}")
    num_heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    tensor_names = {t.name for t in reader.tensors}
    rope_scaling = None
    scaling_type = _field(reader, f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        rope_scaling = {
            "rope_type": scaling_type,
            "factor": _field(reader, f"{arch}.rope.scaling.factor"),
            "original_max_position_embeddings": _field(reader, f"{arch}.rope.scaling.original_context_length"),
        }
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=_field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens")),
        hidden_size=hidden,
        intermediate_size=_field(reader, f"{arch}.feed_forward_length"),
        num_layers=_field(reader, f"{arch}.block_count"),
        num_heads=num_heads,
        num_kv_heads=_field(reader, f"{arch}.attention.head_count_kv", num_heads),
        head_dim=_field(reader, f"{arch}.attention.key_length", hidden // num_heads),
        rms_norm_eps=_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=_field(reader, f"{arch}.rope.freq_base", 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=_field(reader, f"{arch}.context_length", 2048),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        sliding_window=_field(reader, f"{arch}.attention.sliding_window"),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[eos] if eos is not None else [],
    )


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{GGUF_TO_HF_NAMES[parts[2]]}.{parts[3]}"
    return f"{GGUF_TO_HF_NAMES[parts[0]]}.{parts[1]}"


def _undo_rope_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp interleaves the two RoPE halves of q/k rows for Llama; restore the HF order."""
    rows_per_half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, rows_per_half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_gguf(path: Path, dense_blocks: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, QuantizedWeight]]:
    """Config, float32 state dict (HF names), and the blocks of the tensors stored as Q4_0, Q4_1 or Q8_0.
    With dense_blocks False those tensors get no float32 copy: the caller dequantizes what it needs."""
    import gguf

    reader = _open(path)
    cfg = read_gguf_config(reader)
    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantizedWeight] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        row_order = None
        if cfg.architecture in ("llama", "mistral") and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_heads if "attn_q" in tensor.name else cfg.num_kv_heads
            row_order = _undo_rope_permute(np.arange(shape[0]), heads)
        if tensor.tensor_type.name in BLOCK_LAYOUTS and len(shape) == 2:
            quantized[name] = QuantizedWeight.from_gguf(np.asarray(tensor.data), tensor.tensor_type.name, row_order)
            if not dense_blocks:
                continue
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise ModelLoadError(f"{path}: tensor {tensor.name} has unsupported type {tensor.tensor_type.name}") from exc
        array = array.reshape(shape).astype(np.float32, copy=False)
        state[name] = torch.from_numpy(np.array(array if row_order is None else array[row_order], copy=True))
    return cfg, state, quantized
