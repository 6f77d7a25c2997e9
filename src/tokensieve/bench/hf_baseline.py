"""transformers `generate` on the same weights, timed step by step."""

from __future__ import annotations

import time

import torch

from ..weights import resolve_model_path


def load_hf_model(model: str, dtype: torch.dtype, device: str = "cpu"):
    """The transformers reference model from the same GGUF file or folder."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    if path.is_dir():
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).to(device).eval()


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it times that work (CUDA runs ahead)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_generate_timed(hf_model, prompts: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Greedy generate on [batch, length] prompts.

    Returns (seconds until the prompt's logits are ready, seconds for the remaining new_tokens - 1 steps).
    A logits processor notes the time after every forward pass (once the device has finished it).
    """
    from transformers import LogitsProcessor, LogitsProcessorList

    forward_done: list[float] = []
    device = hf_model.device
    prompts = prompts.to(device)

    class StepClock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            _synchronize(device)
            forward_done.append(time.perf_counter())
            return scores

    _synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        hf_model.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([StepClock()]),
        )
    return forward_done[0] - start, forward_done[-1] - forward_done[0]
