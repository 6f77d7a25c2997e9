"""Embeddings from a decoder LLM without training: pool the final-norm hidden states of each text.

"last" takes the last token's state (in a causal model, the only one that has seen the whole text); "mean"
averages every token's, a BOS the tokenizer adds included. A PromptEOL prompt ('This sentence: "{text}"
means in one word:"') asks the last token to sum the text up, which helps models never trained to embed.
Prefill only, without the KV pool: texts of similar lengths are right-padded into one [batch, length] grid
and run through the model with plain causal attention (a text's padding comes after it, so it never sees it).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import ContextLengthError, RequestError
from .models.llama import AttentionFn, LlamaModel

POOLINGS = ("last", "mean")
PROMPTS = {"prompteol": 'This sentence: "{text}" means in one word:"'}


def causal_attention(batch: int, length: int, sliding_window: int | None, device: torch.device) -> AttentionFn:
    """Causal attention within each row of a flat [batch * length] grid; query heads share KV heads in groups."""
    window_mask = None
    if sliding_window is not None and length > sliding_window:
        distance = torch.arange(length, device=device).view(-1, 1) - torch.arange(length, device=device)
        window_mask = (distance >= 0) & (distance < sliding_window)

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        num_heads, head_dim = q.shape[1], q.shape[2]
        q, k, v = (t.view(batch, length, -1, head_dim).transpose(1, 2) for t in (q, k, v))  # [batch, heads, length, dim]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask, is_causal=window_mask is None, enable_gqa=True)
        return out.transpose(1, 2).reshape(batch * length, num_heads, head_dim)

    return attend


def embed_texts(
    model: LlamaModel,
    tokenizer,
    texts: str | Sequence[str],
    pooling: str,
    prompt: str | None,
    normalize: bool,
    batch_size: int,
    max_model_len: int,
) -> torch.Tensor:
    """float32 CPU vectors [len(texts), hidden], or [hidden] for one string (see LLM.embed)."""
    single = isinstance(texts, str)
    batch = _checked_texts(texts)
    template = _checked_template(prompt)
    if pooling not in POOLINGS:
        raise RequestError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise RequestError(f"batch_size must be a positive integer, got {batch_size!r}")
    token_ids = [tokenizer(template.replace("{text}", text)).input_ids for text in batch]
    for index, ids in enumerate(token_ids):
        if len(ids) > max_model_len:
            raise ContextLengthError(max_model_len, len(ids), (
                f"maximum context length is {max_model_len} tokens; text {index} has {len(ids)} tokens"
                f"{'' if template == '{text}' else ' with its prompt'}"
            ))
    vectors = torch.empty(len(batch), model.config.hidden_size)
    by_length = sorted(range(len(batch)), key=lambda i: len(token_ids[i]))  # little padding within a batch
    for start in range(0, len(batch), batch_size):
        rows = by_length[start : start + batch_size]
        vectors[rows] = _pooled(model, [token_ids[i] for i in rows], pooling)
    if normalize:
        vectors = F.normalize(vectors, dim=-1)
    return vectors[0] if single else vectors


def _checked_texts(texts) -> list[str]:
    batch = [texts] if isinstance(texts, str) else texts
    if not isinstance(batch, (list, tuple)) or not batch:
        raise RequestError(f"texts must be a string or a non-empty list of strings, got {texts!r:.80}")
    for index, text in enumerate(batch):
        if not isinstance(text, str) or not text:
            raise RequestError(f"text {index} must be a non-empty string, got {text!r:.80}")
    return list(batch)


def _checked_template(prompt: str | None) -> str:
    """The template each text is put in: the text alone, PromptEOL's, or the caller's own."""
    if prompt is None:
        return "{text}"
    template = PROMPTS.get(prompt, prompt)
    if not isinstance(template, str) or "{text}" not in template:
        raise RequestError(
            f"prompt must be None, one of {', '.join(PROMPTS)}, or a template containing {{text}}, got {prompt!r:.80}"
        )
    return template


def _pooled(model: LlamaModel, token_ids: list[list[int]], pooling: str) -> torch.Tensor:
    """One forward over the texts, right-padded to the longest; their pooled float32 states [texts, hidden]."""
    device = model.norm.weight.device
    lengths = torch.tensor([len(ids) for ids in token_ids])
    batch, length = len(token_ids), int(lengths.max())
    grid = torch.zeros(batch, length, dtype=torch.long)  # padding: token 0, after each text
    for row, ids in enumerate(token_ids):
        grid[row, : len(ids)] = torch.tensor(ids)
    positions = torch.arange(length).repeat(batch)
    attention = causal_attention(batch, length, model.config.sliding_window, device)
    hidden = model.hidden_states(grid.flatten().to(device), positions.to(device), attention)
    hidden = hidden.float().cpu().view(batch, length, -1)
    if pooling == "last":
        return hidden[torch.arange(batch), lengths - 1]
    in_text = (torch.arange(length) < lengths.view(-1, 1)).unsqueeze(-1)
    return (hidden * in_text).sum(1) / lengths.view(-1, 1)
