"""Generation features on the real model: streaming, stop conditions, chats, accounting."""

import torch

from tokensieve import SamplingParams
from tokensieve.engine.detokenizer import IncrementalDetokenizer


def test_incremental_detokenizer_never_splits_a_character(llm):
    text = "Café ☕ costs 5€ — 東京 and 😀 emoji 👩‍💻!"
    ids = llm.tokenizer(text).input_ids
    detok = IncrementalDetokenizer(llm.tokenizer, [])
    deltas = [detok.step(ids[: i + 1]) for i in range(len(ids))]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert len(ids) > len([d for d in deltas if d])  # some tokens were partial characters


class DecodeOnly:
    """A tokenizer with nothing but decode: the detokenizer then decodes the last tokens twice a step."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


def test_decode_stream_gives_the_deltas_of_decoding_twice(llm):
    """The Rust DecodeStream path against the two-decode path, token by token after a prompt: a text with
    multi-byte characters, then random token ids (special tokens and partial characters among them)."""
    prompt = llm.tokenizer("Here is some text:").input_ids
    text_ids = llm.tokenizer(" Café ☕ costs 5€ — 東京 and 😀 emoji 👩‍💻! ¿Qué tal?").input_ids
    random_ids = torch.randint(0, llm.tokenizer._tokenizer.get_vocab_size(), (300,), generator=torch.Generator().manual_seed(0)).tolist()
    streamed, decoded = IncrementalDetokenizer(llm.tokenizer, prompt), IncrementalDetokenizer(DecodeOnly(llm.tokenizer), prompt)
    assert streamed._stream is not None and decoded._stream is None
    ids = list(prompt)
    for token in text_ids + random_ids:
        ids.append(token)
        assert streamed.step(ids) == decoded.step(ids)
    assert streamed.text == decoded.text and streamed.text.startswith(" Café ☕ costs 5€")


def test_special_tokens_never_reach_the_decode_stream(llm):
    """Each would be decoded again at every later step until some text came (none does under ignore_eos)."""
    eos = llm.tokenizer.eos_token_id
    detok = IncrementalDetokenizer(llm.tokenizer, llm.tokenizer("Hi").input_ids)
    fed, stream = [], detok._stream

    class Recording:
        def step(self, tokenizer, token):
            fed.append(token)
            return stream.step(tokenizer, token)

    detok._stream = Recording()
    ids = list(llm.tokenizer("Hi").input_ids)
    for token in [eos] * 50 + llm.tokenizer(" there").input_ids:
        ids.append(token)
        detok.step(ids)
    assert detok.text == " there" and eos not in fed


def test_stream_deltas_add_up_to_the_final_text(llm):
    params = SamplingParams(max_tokens=30, temperature=0)
    deltas, final = [], None
    for out in llm.stream("The capital of France is", params):
        deltas.append(out.delta_text)
        final = out
    assert final.finished and "".join(deltas) == final.text
    assert final.text == llm.generate("The capital of France is", params)[0].text


def test_stop_string_cuts_the_text_and_is_never_streamed(llm):
    full = llm.generate("The capital of France is", SamplingParams(max_tokens=20, temperature=0))[0].text
    assert "Paris" in full
    params = SamplingParams(max_tokens=20, temperature=0, stop=["aris"])
    out = llm.generate("The capital of France is", params)[0]
    assert out.finish_reason == "stop" and out.text == full[: full.index("aris")]
    streamed = "".join(o.delta_text for o in llm.stream("The capital of France is", params))
    assert streamed == out.text


def test_stop_token_ids_and_eos(llm):
    greedy = SamplingParams(max_tokens=20, temperature=0)
    base = llm.generate("The capital of France is", greedy)[0]
    stop_at = base.token_ids[2]
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == base.token_ids[:3] and out.finish_reason == "stop"
    chat = llm.generate([{"role": "user", "content": "What is 2+2?"}], SamplingParams(max_tokens=60, temperature=0))[0]
    assert chat.finish_reason == "stop" and chat.token_ids[-1] in llm.engine.eos_token_ids
    assert "4" in chat.text and "<|im_end|>" not in chat.text


def test_outputs_report_counts_and_timings(llm):
    out = llm.generate("Hello there", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.num_generated_tokens == 5 and out.finish_reason == "length"
    assert out.num_prompt_tokens == len(llm.tokenizer("Hello there").input_ids)
    assert 0 < out.metrics.time_to_first_token <= out.metrics.total_time
    assert out.metrics.decode_tokens_per_second > 0


def test_kv_memory_is_exact_while_running(fresh_llm):
    engine = fresh_llm.engine
    cfg = engine.model.config
    prompt = fresh_llm.encode("One two three four five six seven")
    engine.add_request(prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    engine.step()  # prefill: every prompt token stored in every (layer, KV head)
    memory = engine.kv_memory()
    per_entry = 2 * cfg.head_dim * 4
    assert memory["in_use_bytes"] == len(prompt) * cfg.num_layers * cfg.num_kv_heads * per_entry
    blocks = -(-len(prompt) // engine.config.block_size) * cfg.num_layers * cfg.num_kv_heads
    assert memory["allocated_bytes"] == blocks * engine.config.block_size * per_entry
    while engine.has_unfinished():
        engine.step()
    assert engine.kv_memory()["allocated_bytes"] == 0
