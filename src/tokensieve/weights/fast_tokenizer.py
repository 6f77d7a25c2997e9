"""Encoding and decoding straight from tokenizer.json with the `tokenizers` library (0.1 s to load),
without importing transformers (about 1 s), which only chats and other uses need."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# tokenizer classes that are tokenizer.json as it is: transformers adds nothing when it loads one
PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# settings with which transformers changes what tokenizer.json does (a BOS it adds, spaces it cleans up)
ALTERING_SETTINGS = ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces", "add_prefix_space")


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def serves_folder(folder: Path) -> bool:
    """Whether the folder's tokenizer is exactly its tokenizer.json (then FastTokenizer gives transformers' ids and text)."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        (folder / "tokenizer.json").is_file()
        and config.get("tokenizer_class") in PLAIN_CLASSES
        and not any(config.get(name) for name in ALTERING_SETTINGS)
    )


class FastTokenizer:
    """The transformers tokenizer of a folder that `serves_folder` accepts: encode, decode, the special
    tokens and their ids are done here; anything else (apply_chat_template, ...) is delegated to the
    transformers tokenizer, loaded by `load_full` on first use."""

    def __init__(self, folder: Path, load_full: Callable[[], Any]):
        from tokenizers import Tokenizer

        self._folder = folder
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        for name in SPECIAL_TOKENS:
            text = _token_text(config.get(name))
            setattr(self, name, text)
            setattr(self, f"{name}_id", None if text is None else self._tokenizer.token_to_id(text))
        self._load_full = load_full
        self._full = None

    @property
    def full(self):
        """The transformers tokenizer of the same folder (loaded on first use)."""
        if self._full is None:
            self._full = self._load_full()
        return self._full

    def __getattr__(self, name: str):  # called only for what this class does not have
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.full, name)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text, add_special_tokens: bool = True, **options):
        if not isinstance(text, str) or options:  # batches, tensors, padding...: transformers' own
            return self.full(text, add_special_tokens=add_special_tokens, **options)
        return SimpleNamespace(input_ids=self.encode(text, add_special_tokens))

    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        if clean_up_tokenization_spaces:
            return self.full.decode(token_ids, skip_special_tokens, clean_up_tokenization_spaces)
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
