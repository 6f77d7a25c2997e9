"""BERT, the encoder of sentence-embedding models (all-MiniLM-L6-v2 and kin), as one readable module.

Post-norm encoder: x = LayerNorm(x + Attention(x)); x = LayerNorm(x + FFN(x)), with learned absolute
positions. Every token carries a size (1 for a real token, 0 for a pad): attention adds log(size) to
its logits, which masks pads (log 0 = -inf) and, once tokens are merged, weighs a merged token by how
many it stands for (ToMe's proportional attention, which a reducer may turn off). Between each
layer's attention and its feed-forward block, an optional `reducer` merges or prunes tokens (merging/).
On a CPU the linears run through oneDNN with their bias, GELU or residual add fused into the matrix
product: the encoder is bound by its matrix products, and the fusion saves a pass over each output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError

ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
# below this many tokens per row, attention as two batched matrix products beats the fused kernel
SHORT_ROWS = 64
FUSED_ADD_ROWS = 2048


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "BertConfig":
        if hf.get("model_type") != "bert":
            raise ModelLoadError(f"expected a BERT config (model_type 'bert'), got model_type {hf.get('model_type')!r}")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ModelLoadError(f"position_embedding_type {hf['position_embedding_type']!r} is not supported")
        if hf.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise ModelLoadError(f"hidden_act {hf['hidden_act']!r} is not supported; known: {', '.join(ACTIVATIONS)}")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            activation=hf.get("hidden_act", "gelu"),
        )


class TokenReducer(Protocol):
    """Merges or prunes tokens between a layer's attention and its feed-forward block."""

    def wants_attention(self, layer: int) -> bool:
        """Whether `reduce` needs this layer's attention probabilities."""

    def attention_bias(self, size: torch.Tensor) -> torch.Tensor:
        """What each token adds to the attention logits [B, S]: log(size), or 0 / -inf (pads) alone."""

    def reduce(self, layer: int, x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor,
               attention: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, D], size [B, S], keys [B, heads, S, head_dim] -> the reduced x and size."""


def _fused(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        """activation(x W^T + b), the activation fused into the product where oneDNN runs it."""
        if _fused(x):
            algorithm = "tanh" if activation == "gelu_tanh" else "none"
            attr = "gelu" if activation.startswith("gelu") else activation
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, attr, [None], algorithm)
        y = F.linear(x, self.weight, self.bias)
        if activation == "none":
            return y
        return F.relu(y) if activation == "relu" else F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + x W^T + b, the add fused into the product where oneDNN runs it on enough rows (the
        fused add costs a fixed ~0.4 ms a call, more than it saves on small batches)."""
        if _fused(x) and x.numel() // x.shape[-1] >= FUSED_ADD_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x, residual, self.weight, self.bias, "add")
        return torch.addmm(self.bias, x.flatten(0, -2), self.weight.t()).view_as(residual).add_(residual)


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Every token is of segment 0 (one sentence per row)."""
        positions = self.position_embeddings.weight[: token_ids.shape[1]]
        return self.LayerNorm(self.word_embeddings(token_ids) + positions + self.token_type_embeddings.weight[0])


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # query, key and value stacked
        self.output = Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, log_size: torch.Tensor, want_probs: bool):
        """LayerNorm(x + attention), the keys [B, heads, S, head_dim] and, if wanted, the attention
        probabilities [B, heads, S, S]. log_size [B, 1, 1, S] is added to every logit."""
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        probs = None
        if want_probs or seq <= SHORT_ROWS:
            logits = torch.matmul(q, k.transpose(-1, -2)).mul_(1 / math.sqrt(self.head_dim)).add_(log_size)
            probs = logits.softmax(-1)
            context = torch.matmul(probs, v)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=log_size)
        context = context.transpose(1, 2).reshape(batch, seq, hidden)
        return self.LayerNorm(self.output.add(context, x)), k, probs if want_probs else None


class FeedForward(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.activation = ACTIVATIONS[cfg.activation]
        self.intermediate = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.output.add(self.intermediate(x, self.activation), x))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.feed_forward = FeedForward(cfg)


class BertModel(nn.Module):
    """Token ids [B, S] and token sizes [B, S] in; final hidden states and sizes out (fewer tokens if
    a reducer merged some)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, size: torch.Tensor, reducer: TokenReducer | None = None):
        x = self.embeddings(token_ids)
        size = size.to(x.dtype)
        for index, layer in enumerate(self.layers):
            want_probs = reducer is not None and reducer.wants_attention(index)
            bias = size.log() if reducer is None else reducer.attention_bias(size)
            x, keys, probs = layer.attention(x, bias[:, None, None, :], want_probs)
            if reducer is not None:
                x, size = reducer.reduce(index, x, size, keys, probs)
            x = layer.feed_forward(x)
        return x, size


def bert_state_dict(cfg: BertConfig, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face BERT state dict to ours, stacking query, key and value."""
    state = {name.removeprefix("bert."): tensor for name, tensor in hf_state.items()}
    ours: dict[str, torch.Tensor] = {}
    try:
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            ours[f"embeddings.{name}.weight"] = state[f"embeddings.{name}.weight"]
        for part in ("weight", "bias"):
            ours[f"embeddings.LayerNorm.{part}"] = state[f"embeddings.LayerNorm.{part}"]
        for i in range(cfg.num_layers):
            hf, we = f"encoder.layer.{i}", f"layers.{i}"
            for part in ("weight", "bias"):
                ours[f"{we}.attention.qkv.{part}"] = torch.cat(
                    [state[f"{hf}.attention.self.{name}.{part}"] for name in ("query", "key", "value")])
                ours[f"{we}.attention.output.{part}"] = state[f"{hf}.attention.output.dense.{part}"]
                ours[f"{we}.attention.LayerNorm.{part}"] = state[f"{hf}.attention.output.LayerNorm.{part}"]
                ours[f"{we}.feed_forward.intermediate.{part}"] = state[f"{hf}.intermediate.dense.{part}"]
                ours[f"{we}.feed_forward.output.{part}"] = state[f"{hf}.output.dense.{part}"]
                ours[f"{we}.feed_forward.LayerNorm.{part}"] = state[f"{hf}.output.LayerNorm.{part}"]
    except KeyError as exc:
        raise ModelLoadError(f"BERT weights are missing tensor {exc.args[0]}") from exc
    return ours
