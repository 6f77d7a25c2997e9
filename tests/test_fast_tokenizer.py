"""FastTokenizer (tokenizer.json through the `tokenizers` library) gives transformers' ids and text."""

import subprocess
import sys

import pytest

from tokensieve.weights.fast_tokenizer import FastTokenizer
from tokensieve.weights.loader import load_tokenizer

TEXTS = [
    "Hello world", " leading space", "Tabs\tand\nnewlines\n\n", "naïve café, 42 °C", "数学 and emoji 🙂👍🏽",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>", "", "   ", "def f(x):\n    return x ** 2  # code",
    "a" * 300,
]


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import AutoTokenizer

    fast = load_tokenizer("smollm2-135m")
    assert isinstance(fast, FastTokenizer)
    return fast, AutoTokenizer.from_pretrained(str(fast._folder))


def test_ids_and_text_are_transformers(tokenizers):
    fast, reference = tokenizers
    for text in TEXTS:
        for special in (True, False):
            ids = reference.encode(text, add_special_tokens=special)
            assert fast.encode(text, add_special_tokens=special) == ids
            assert fast(text, add_special_tokens=special).input_ids == reference(text, add_special_tokens=special).input_ids
        with_specials = [reference.eos_token_id] + reference.encode(text) + [reference.bos_token_id, 5, 17]
        for skip in (True, False):
            assert fast.decode(with_specials, skip_special_tokens=skip) == reference.decode(with_specials, skip_special_tokens=skip)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(fast, name) == getattr(reference, name)
        assert getattr(fast, f"{name}_id") == getattr(reference, f"{name}_id")


def test_chats_and_everything_else_are_transformers_own(tokenizers):
    fast, reference = tokenizers
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
    for prompt in (True, False):
        assert fast.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt) == \
            reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
    assert fast(["two", "texts"]).input_ids == reference(["two", "texts"]).input_ids
    assert fast.chat_template == reference.chat_template


def test_a_plain_prompt_runs_without_importing_transformers():
    script = (
        "import sys; from tokensieve import LLM, SamplingParams; llm = LLM(); "
        "out = llm.generate('The sky is', SamplingParams(max_tokens=2, temperature=0))[0]; "
        "assert out.num_generated_tokens == 2; print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
