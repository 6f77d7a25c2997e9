"""Random-weight models of real models' shapes, ours beside transformers' on the same weights: what
`bench speed --shape` and benchmarks/scripts/gpu_check.py measure where the real weights are not at hand.

Every shape has SmolLM2's vocabulary (49152 tokens: the packaged default model's tokenizer), whatever
the real model's is; weights are drawn as transformers initialises them (normal, std 0.02), seeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, ModelLoadError
from ..models.config import ModelConfig
from ..models.llama import LlamaModel
from ..weights import load_tokenizer
from ..weights.loader import build_model, engine_state_dict
from ..weights.packaged import DEFAULT_MODEL
from ..weights.weight_cache import LoadedWeights

VOCAB_SIZE = 49152  # SmolLM2's
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# transformers model_type and config fields of each shape. Context windows are shorter than the real
# models' (131072, 32768) where that keeps per-position tables small; the rope is the real one.
SHAPES: dict[str, tuple[str, dict]] = {
    "llama-3.2-1b": ("llama", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, max_position_embeddings=16384,
        tie_word_embeddings=True,
    )),
    "qwen2.5-0.5b": ("qwen2", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True,
    )),
    "tiny": ("llama", dict(  # the 1B's kind of model, small enough for tests and quick runs on a CPU
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**LLAMA3_ROPE, "factor": 8.0, "original_max_position_embeddings": 32},
        max_position_embeddings=4096, tie_word_embeddings=True,
    )),
}


@dataclass
class ShapeModels:
    """One set of random weights as our model and as transformers', with a tokenizer of their vocabulary."""

    ours: LlamaModel
    hf: torch.nn.Module
    tokenizer: object
    tokenizer_source: str  # "smollm2-135m", or "stand-in" where the packaged model is not installed


def hf_config(name: str):
    """transformers' config of a shape (ConfigError naming the known shapes for an unknown name)."""
    if name not in SHAPES:
        raise ConfigError(f"unknown model shape {name!r}; known shapes: {', '.join(SHAPES)}")
    from transformers import AutoConfig

    model_type, fields = SHAPES[name]
    return AutoConfig.for_model(model_type, vocab_size=VOCAB_SIZE, initializer_range=0.02, bos_token_id=1,
                                eos_token_id=2, **fields)


def ours_from_hf(hf_model) -> LlamaModel:
    """Our model on transformers' model's weights, on its device in its dtype (q/k/v and gate/up fused into
    copies, the other tensors shared), as the loader builds one from a Hugging Face folder."""
    cfg = ModelConfig.from_hf_dict(hf_model.config.to_dict())
    state = engine_state_dict(cfg, hf_model.state_dict())
    net = build_model(LoadedWeights(cfg, state), Path(f"<{cfg.architecture} in memory>"))
    return net.to(device=hf_model.device, dtype=hf_model.dtype).eval()


def build_shape(name: str, dtype: torch.dtype, device: str | torch.device, seed: int = 0) -> ShapeModels:
    """Random weights of shape `name`, drawn on `device` in `dtype`, as our model and transformers'."""
    from transformers import AutoModelForCausalLM

    config = hf_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    tokenizer, source = vocabulary_tokenizer()
    return ShapeModels(ours_from_hf(hf), hf, tokenizer, source)


def vocabulary_tokenizer() -> tuple[object, str]:
    """The packaged default model's tokenizer, or, where that is not installed (a GPU machine without it), a
    stand-in with as many tokens: random token ids never need the real text. Returns it and which it is."""
    try:
        return load_tokenizer(DEFAULT_MODEL), DEFAULT_MODEL
    except ModelLoadError:
        return stand_in_tokenizer(VOCAB_SIZE), "stand-in"


def stand_in_tokenizer(vocab_size: int):
    """A word-level tokenizer of `vocab_size` tokens "<0>", "<1>", ...; "<2>" is the end of a text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<0>", bos_token="<1>", eos_token="<2>")


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters, each tensor once (tied embeddings count once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
