"""Prompts with a long context and a question asked after it (the query-agnostic KV setting)."""

from __future__ import annotations


def context_question_ids(tokenizer, context: str, question: str) -> tuple[list[int], list[int]]:
    """Token ids of a chat turn whose user message is `context` followed by `question`, split where
    the question starts, so that the context can be compressed before the question is seen.
    The layout is kvpress's: with a chat template, the question ends the user turn and the
    assistant header follows it; without one, the context starts with BOS and a newline ends the question."""
    if tokenizer.chat_template is None:
        context_text, question_suffix = (tokenizer.bos_token or "") + context, "\n"
    else:
        separator = "#" * (len(context) + 10)
        turn = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + separator}], add_generation_prompt=True, tokenize=False
        )
        context_text, question_suffix = turn.split(separator)
    context_ids = tokenizer.encode(context_text, add_special_tokens=False)
    question_ids = tokenizer.encode(question + question_suffix, add_special_tokens=False)
    return context_ids, question_ids
