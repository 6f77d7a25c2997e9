"""Incremental detokenization: text deltas that never split a multi-byte character."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Decodes a growing list of token ids; `step` returns only the newly completed text.

    A token may end inside a UTF-8 character (the text then ends in U+FFFD); such text is held
    back until a later token completes it. Decoding restarts from a few tokens back rather than
    from the beginning, so a step costs the same at token 10 and token 10,000.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int]):
        self.tokenizer = tokenizer
        # start a few prompt tokens back so the first output token decodes with its left context
        self.prefix_offset = max(len(prompt_token_ids) - 5, 0)
        self.read_offset = len(prompt_token_ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def step(self, all_token_ids: list[int]) -> str:
        prefix_text = self._decode(all_token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(all_token_ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        delta = full_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(all_token_ids)
        self.text += delta
        return delta
