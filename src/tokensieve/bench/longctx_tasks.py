"""Long-context cases generated from a seed: needles in natural text (single, multi-key,
multi-value), needle threading, variable tracking, and perplexity on long text.

The natural text is the news articles of Spec-Bench's summarization prompts (Apache-2.0), shipped
in bench/data. Every case is a pair of token ids: the context (compressed by a KV policy) and the
question (seen after compression in the query-agnostic setting).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..prompts import context_question_ids

SPEC_BENCH = Path(__file__).parent / "data" / "spec_bench" / "question.jsonl"
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "needle_threading", "variable_tracking", "perplexity")
PERPLEXITY_TOKENS = 256  # the scored continuation of a perplexity case
ANSWER_TOKENS = {"niah_multivalue": 48, "variable_tracking": 40}  # others: 24
_WORDS = (
    "amber falcon quiet river copper lantern velvet orchard silent harbor crimson meadow hollow summit golden "
    "willow frozen canyon marble garden bright comet silver thistle rusty anchor gentle breeze scarlet maple"
).split()


@dataclass
class Case:
    task: str
    length: int  # target prompt length in tokens
    index: int
    context_ids: list[int]
    question_ids: list[int]
    answers: list[str] = field(default_factory=list)  # strings the output must contain (score = share found)

    @property
    def max_new_tokens(self) -> int:
        return ANSWER_TOKENS.get(self.task, 24)


def article_sentences(path: Path = SPEC_BENCH) -> list[str]:
    """Sentences of the shipped news articles, in order."""
    sentences = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row["category"] != "summarization":
            continue
        text = row["turns"][0].removeprefix("Summarize:").strip()
        sentences.extend(s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip())
    return sentences


class CaseMaker:
    def __init__(self, tokenizer, seed: int = 0):
        self.tokenizer = tokenizer
        self.seed = seed
        self.sentences = article_sentences()
        self.sentence_tokens = [len(ids) for ids in tokenizer(self.sentences, add_special_tokens=False).input_ids]

    def make(self, task: str, length: int, index: int) -> Case:
        if task not in TASKS:
            raise ValueError(f"unknown long-context task {task!r}; known tasks: {', '.join(TASKS)}")
        rng = random.Random(f"{self.seed}-{task}-{length}-{index}")
        if task == "perplexity":
            ids = self.tokenizer(" ".join(self._haystack(rng, length + 64)), add_special_tokens=False).input_ids[:length]
            return Case(task, length, index, ids[:-PERPLEXITY_TOKENS], ids[-PERPLEXITY_TOKENS:])
        context, question, answers = getattr(self, f"_{task}")(rng, length - 80)  # room for the question and template
        context_ids, question_ids = context_question_ids(self.tokenizer, context, question)
        return Case(task, length, index, context_ids, question_ids, answers)

    # ---- building blocks -------------------------------------------------------------------------
    def _haystack(self, rng: random.Random, num_tokens: int) -> list[str]:
        """Consecutive sentences from a random place in the articles, about `num_tokens` tokens."""
        start = rng.randrange(len(self.sentences))
        out, total = [], 0
        while total < num_tokens:
            i = (start + len(out)) % len(self.sentences)
            out.append(self.sentences[i])
            total += self.sentence_tokens[i] + 1
        return out

    def _with_needles(self, rng, num_tokens: int, needles: list[str], ordered: bool = False) -> str:
        needle_tokens = sum(len(self.tokenizer(n, add_special_tokens=False).input_ids) + 1 for n in needles)
        sentences = self._haystack(rng, num_tokens - needle_tokens)
        places = sorted(rng.randrange(len(sentences) + 1) for _ in needles) if ordered else [
            rng.randrange(len(sentences) + 1) for _ in needles
        ]
        for offset, (place, needle) in enumerate(zip(places, needles)):
            sentences.insert(place + offset, needle)
        return " ".join(sentences)

    @staticmethod
    def _key(rng) -> str:
        return f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}"

    @staticmethod
    def _number(rng) -> str:
        return str(rng.randrange(1_000_000, 10_000_000))

    @staticmethod
    def _needle(key: str, value: str) -> str:
        return f"The special magic number for {key} is: {value}."

    # ---- tasks -------------------------------------------------------------------------------
    def _niah_single(self, rng, num_tokens):
        key, value = self._key(rng), self._number(rng)
        context = self._with_needles(rng, num_tokens, [self._needle(key, value)])
        return context, f"What is the special magic number for {key} mentioned in the text?", [value]

    def _niah_multikey(self, rng, num_tokens):
        keys = set()
        while len(keys) < 4:
            keys.add(self._key(rng))
        keys = sorted(keys)
        values = [self._number(rng) for _ in keys]
        context = self._with_needles(rng, num_tokens, [self._needle(k, v) for k, v in zip(keys, values)])
        asked = rng.randrange(len(keys))
        return context, f"What is the special magic number for {keys[asked]} mentioned in the text?", [values[asked]]

    def _niah_multivalue(self, rng, num_tokens):
        key, values = self._key(rng), [self._number(rng) for _ in range(4)]
        context = self._with_needles(rng, num_tokens, [self._needle(key, v) for v in values])
        return context, f"What are all the special magic numbers for {key} mentioned in the text?", values

    def _needle_threading(self, rng, num_tokens, hops: int = 2):
        """Lines `key -> value` of random 8-hex-digit strings; one chain of `hops` links hides among them."""
        hexes = set()
        while len(hexes) < num_tokens // 3:
            hexes.add(f"{rng.getrandbits(32):08x}")
        hexes = list(hexes)
        chain = hexes[: hops + 1]
        links = [f"{a} -> {b}" for a, b in zip(chain, chain[1:])]
        pairs = [f"{hexes[i]} -> {hexes[i + 1]}" for i in range(hops + 1, len(hexes) - 1, 2)]
        counts = [len(ids) + 1 for ids in self.tokenizer(links + pairs, add_special_tokens=False).input_ids]
        room = num_tokens - 10 - sum(counts[:hops])
        lines = []
        for line, count in zip(pairs, counts[hops:]):
            if count > room:
                break
            lines.append(line)
            room -= count
        for link in links:
            lines.insert(rng.randrange(len(lines) + 1), link)
        context = "Each line maps a key to a value.\n" + "\n".join(lines)
        question = (
            f"\nStart at key {chain[0]}, take its value as the next key, and look that up too. "
            f"After {hops} steps, what value do you reach?"
        )
        return context, question, [chain[-1]]

    def _variable_tracking(self, rng, num_tokens, hops: int = 4):
        names = set()
        while len(names) < hops + 1:
            names.add("".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
        names, value = list(names), self._number(rng)[:5]
        assignments = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        context = self._with_needles(rng, num_tokens, assignments, ordered=True)
        question = f"Find all variables that are assigned the value {value} in the text above."
        return context, question, names
