"""The Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM) as one readable PyTorch module.

Pre-norm decoder: x += Attention(RMSNorm(x)); x += SwiGLU(RMSNorm(x)). Attention uses RoPE and
grouped-query heads; Qwen2 adds a bias to q/k/v, Qwen3 an RMSNorm on each q and k head.
The model never sees the KV cache: each layer hands its new q, k, v to `attention(layer, q, k, v)`,
which stores k and v and returns the attention output (see engine/attention.py).
q/k/v and gate/up are fused into single matrices, and each residual add is fused into the
output projection (addmm): decoding one token is dominated by per-op overhead. For the same reason
RMSNorm, the rotary embedding and SwiGLU's silu(gate) * up run as one call each: a Triton kernel on
CUDA (kernels/triton_ops.py), a native one on the CPU when the loader hands them the kernels
(kernels/layer_ops.cpp).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import layer_ops
from .config import ModelConfig
from .int8_weight import Int8Weight
from .quantized import QuantizedWeight
from .rope import RotaryEmbedding, apply_rotary

AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    kernels = None  # the native kernels, set by the loader

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = layer_ops(self.kernels, x)
        if ops is not None:
            return ops.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # normalise in float32, scale in the model dtype (as the reference implementation does)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Embedding(nn.Module):
    """Token id -> row of the embedding matrix; read from the GGUF blocks when the loader sets `native`
    (then the module keeps no float32 copy: its weight is None)."""

    native: QuantizedWeight | Int8Weight | None = None

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))  # filled by the loader

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.weight) if self.native is None else self.native.rows(token_ids)


class Linear(nn.Linear):
    """nn.Linear that, given its weights' GGUF blocks and the native kernels, multiplies the blocks:
    with float32 activations for a few rows at a time, with int8 activations for any number (then the
    dense weight is None: the loader keeps only the blocks)."""

    native: QuantizedWeight | Int8Weight | None = None  # set by the loader, with the kernels
    kernels = None

    def uses_kernel(self, x: torch.Tensor) -> bool:
        return self.native is not None and x.shape[0] <= self.native.max_rows and x.dtype == torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernel(x):
            return F.linear(x, self.weight, self.bias)
        out = self.native.matmul(x, self.kernels)
        return out if self.bias is None else out + self.bias


def add_linear(residual: torch.Tensor, x: torch.Tensor, linear: Linear) -> torch.Tensor:
    """residual + linear(x); as one fused op on the dense path (block-ending projections have no bias)."""
    if linear.uses_kernel(x):
        return residual + linear(x)
    return torch.addmm(residual, x, linear.weight.t())


class Attention(nn.Module):
    kernels = None  # the native kernels (rotary), set by the loader

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qk_size = q_size + kv_size
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, attention: AttentionFn) -> torch.Tensor:
        """Attention output [tokens, heads * head_dim], before the output projection."""
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        qk = qkv[:, : self.qk_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.qk_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        q, k = apply_rotary(qk, cos, sin, self.kernels).split([self.num_heads, self.num_kv_heads], dim=1)
        return attention(self.layer_index, q, k, v).reshape(num_tokens, -1)


class SwiGLU(nn.Module):
    kernels = None  # the native kernels (silu_mul), set by the loader

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up, before the down projection."""
        gate_up = self.gate_up_proj(x)
        ops = layer_ops(self.kernels, gate_up)
        if ops is not None:
            return ops.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, attention):
        x = add_linear(x, self.self_attn(self.input_layernorm(x), cos, sin, attention), self.self_attn.o_proj)
        return add_linear(x, self.mlp.hidden(self.post_attention_layernorm(x)), self.mlp.down_proj)


class LlamaModel(nn.Module):
    """Token ids of a flat batch in, logits of the requested rows out."""

    activations = "float32"  # what enters the GGUF-block matmuls: set to "int8" by the loader when it packs them

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionFn,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """token_ids, positions: [tokens]. Returns float32 logits [len(logits_rows), vocab] (all rows if None)."""
        return self.lm_head(self.hidden_states(token_ids, positions, attention, logits_rows)).float()

    @torch.inference_mode()
    def hidden_states(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionFn,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-norm hidden states [len(rows), hidden] (all rows if None), in the model's dtype."""
        x = self.embed_tokens(token_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attention)
        if rows is not None:
            x = x[rows]
        return self.norm(x)
