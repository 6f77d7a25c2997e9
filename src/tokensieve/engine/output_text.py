"""A request's output text: incremental detokenization, stop strings, and safe streaming deltas."""

from __future__ import annotations

from .detokenizer import IncrementalDetokenizer


class OutputText:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop_strings: list[str]):
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self.stop_strings = stop_strings
        # text that might be the start of a stop string is not streamed until it is settled
        self.holdback = max((len(s) for s in stop_strings), default=1) - 1
        self.text = ""
        self.num_emitted = 0

    def update(self, all_token_ids: list[int]) -> bool:
        """Decode the newest token; True if a stop string appeared (the text is cut before it)."""
        delta = self.detokenizer.step(all_token_ids)
        if not delta:
            return False
        search_from = max(len(self.text) - self.holdback, 0)
        self.text += delta
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop_strings) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out; while running, the last few characters may be held back."""
        end = len(self.text) if finished else max(len(self.text) - self.holdback, self.num_emitted)
        delta = self.text[self.num_emitted : end]
        self.num_emitted = end
        return delta
