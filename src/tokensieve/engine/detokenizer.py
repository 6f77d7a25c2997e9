"""Incremental detokenization: text deltas that never split a multi-byte character."""

from __future__ import annotations

CONTEXT_TOKENS = 5  # prompt tokens decoded before the output, so its first token decodes with its left context


class IncrementalDetokenizer:
    """Decodes a growing list of token ids; `step` returns only the newly completed text.

    A token may end inside a UTF-8 character (the text then ends in U+FFFD); such text is held
    back until a later token completes it. Decoding restarts from a few tokens back rather than
    from the beginning, so a step costs the same at token 10 and token 10,000. With a Rust
    tokenizer behind it (`tokenizers`), its DecodeStream does this in one call per step (a third of
    the two decodes a step otherwise takes: host time every decoding sequence costs every step), and
    special tokens, which add no text, never reach it: a run of them would otherwise be decoded again
    at every step, as the text it waits for never comes.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.prefix_offset = max(len(prompt_token_ids) - CONTEXT_TOKENS, 0)
        self.read_offset = len(prompt_token_ids)
        self.text = ""
        self._rust, self._stream, self._special = _decode_stream(tokenizer, prompt_token_ids[self.prefix_offset :])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def step(self, all_token_ids: list[int]) -> str:
        if self._stream is not None:
            new = [token for token in all_token_ids[self.read_offset :] if token not in self._special]
            delta = "".join(self._stream.step(self._rust, token) or "" for token in new)
            self.read_offset = len(all_token_ids)
        else:
            delta = self._decoded_delta(all_token_ids)
        self.text += delta
        return delta

    def _decoded_delta(self, all_token_ids: list[int]) -> str:
        """The new text by decoding the last few tokens with and without the new ones."""
        prefix_text = self._decode(all_token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(all_token_ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(all_token_ids)
        return full_text[len(prefix_text) :]


def _decode_stream(tokenizer, context_token_ids: list[int]):
    """(the Rust tokenizer, a DecodeStream that has read the context, the special token ids) where the
    tokenizer has one; else (None, None, None)."""
    from tokenizers import Tokenizer
    from tokenizers.decoders import DecodeStream

    rust = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(rust, Tokenizer):
        return None, None, None
    special = frozenset(token for token, added in rust.get_added_tokens_decoder().items() if added.special)
    stream = DecodeStream(skip_special_tokens=True)
    for token in context_token_ids:
        if token not in special:
            stream.step(rust, token)
    return rust, stream, special
