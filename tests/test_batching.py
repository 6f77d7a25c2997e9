"""Batch invariance: a prompt's greedy output does not depend on what runs beside it or how."""

import pytest

from tokensieve import SamplingParams

PROMPTS = [
    "The capital of France is",
    "Write a haiku about autumn leaves falling in a quiet park.",
    "List three uses of copper.",
    "In 1969, the first humans landed on the Moon. Describe what they saw, what they did, and how "
    "they returned to Earth, in a few sentences for a curious child.",
    "def fibonacci(n):",
    "Translate 'good morning' into Spanish, French and German.",
    "Why do cats purr?",
    "Summarize the plot of a story in which a young engineer builds a bridge across a canyon to "
    "reunite two villages that have not spoken for a hundred years, and learns patience on the way.",
]
GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(llm):
    return [llm.generate(p, GREEDY)[0].token_ids for p in PROMPTS]


def test_batch_of_8_mixed_lengths_matches_alone(llm, alone):
    batched = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in batched] == alone


def test_chunked_prefill_matches_alone(llm, alone):
    chunked = llm.with_options(prefill_chunk_size=7, max_batched_tokens=20)
    assert [o.token_ids for o in chunked.generate(PROMPTS, GREEDY)] == alone


def test_preempted_sequences_are_recomputed_exactly(llm, alone):
    # room for about three of the eight sequences at full length: the newest are preempted and recomputed
    small = llm.with_options(kv_cache_bytes=3 * 90 * 6 * 16 * 512)
    outputs = small.generate(PROMPTS, GREEDY)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outputs] == alone
    assert small.engine.block_manager.num_used_blocks == 0


def test_seeded_sampling_ignores_the_rest_of_the_batch(llm):
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234)
    alone = llm.generate(PROMPTS[1], params)[0].token_ids
    others = SamplingParams(max_tokens=24, temperature=0.8, seed=5)
    batched = llm.generate(PROMPTS[:4], [others, params, others, others])[1].token_ids
    assert batched == alone
    assert llm.generate(PROMPTS[1], SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=99))[0].token_ids != alone
