"""How many kernels a request's steps launch on a GPU, counted on the CPU.

A model with the Llama-3.2-1B's layer count and head grouping (16 layers, 4 query heads per KV head;
narrow, random weights in bfloat16: the count does not depend on width) prefills one prompt (an eager
forward) and decodes one token through the static step, twice: with the layer ops (RMSNorm, rotary,
SwiGLU's silu * up, the KV store) as the PyTorch ops they were on CUDA before kernels/triton_ops.py, and
with those Triton kernels. Both use the Triton decode attention. Triton runs through its interpreter;
every PyTorch op that launches a kernel is counted (views and allocations are not; nor are the prefill's
copies of its inputs to the device, which the CPU does not make), and every Triton launch. Inside a CUDA
graph each launch still costs the GPU a few microseconds, which at batch 1 is what stands between a small
model and its bandwidth limit (METHODS.md section 5).

    PYTHONPATH=src .venv/bin/python benchmarks/scripts/decode_launches.py
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit decorates: before the kernels are imported

import argparse  # noqa: E402
import collections  # noqa: E402
import functools  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from tokensieve import SamplingParams  # noqa: E402
from tokensieve.bench.model_shapes import ours_from_hf, stand_in_tokenizer  # noqa: E402
from tokensieve.config import EngineConfig  # noqa: E402
from tokensieve.engine import static_inputs  # noqa: E402
from tokensieve.engine.engine import LLMEngine  # noqa: E402
from tokensieve.engine.triton_decode import paged_decode_attention_triton  # noqa: E402
from tokensieve.kernels import chosen_layer_ops, triton_ops  # noqa: E402

# PyTorch ops that launch nothing: views, allocations, metadata
NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "unsqueeze", "squeeze", "transpose", "t", "expand", "slice",
    "select", "split", "split_with_sizes", "chunk", "unbind", "alias", "as_strided", "permute", "detach", "lift_fresh",
    "empty", "empty_like", "empty_strided", "expand_as", "view_as",
}


class Launches(TorchDispatchMode):
    """Counts PyTorch ops that launch a kernel, and Triton launches (the interpreter's own work not counted),
    while entered."""

    active = None  # the counter Triton launches go to

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.in_triton = False

    def __enter__(self):
        Launches.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        Launches.active = None
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if not self.in_triton and name not in NO_LAUNCH and (name != "to" or out is not args[0]):
            self.counts[name] += 1  # a `to` that changes nothing returns its input: no copy
        return out

    @staticmethod
    def counting(run):
        """InterpretedFunction.run, counted by the active counter."""
        def counted(kernel, *args, **kwargs):
            counter = Launches.active
            if counter is None:
                return run(kernel, *args, **kwargs)
            counter.counts[f"triton {kernel.fn.__name__}"] += 1
            counter.in_triton = True
            try:
                return run(kernel, *args, **kwargs)
            finally:
                counter.in_triton = False
        return counted


def counted(counter: Launches, function):
    def wrapper(*args, **kwargs):
        with counter:
            return function(*args, **kwargs)
    return wrapper


def step_launches(engine: LLMEngine, triton_layer_ops: bool, prompt_length: int) -> tuple[collections.Counter, ...]:
    """Launches of a fresh request's prefill (one eager forward of the prompt) and of the forward of its first
    static decode step."""
    request = engine.add_request(list(range(1, prompt_length + 1)), SamplingParams(max_tokens=8, temperature=0,
                                                                                  ignore_eos=True))
    decoder, prefill, decode = engine.runner.static_decoder, Launches(), Launches()
    with ExitStack() as patches:
        enter = patches.enter_context
        enter(mock.patch.object(InterpretedFunction, "run", Launches.counting(InterpretedFunction.run)))
        # split-K as at batch 1 on a GPU (the interpreter would take one split, which skips the combine)
        attention = functools.partial(paged_decode_attention_triton, num_splits=2)
        enter(mock.patch.object(static_inputs, "paged_decode_attention", attention))
        if triton_layer_ops:
            enter(chosen_layer_ops(triton_ops))
        with mock.patch.object(engine.runner, "run", counted(prefill, engine.runner.run)):
            engine.step()
        with mock.patch.object(decoder, "_forward", counted(decode, decoder._forward)):
            engine.step()
    engine.abort(request)
    return prefill.counts, decode.counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens, prefilled in one chunk")
    args = parser.parse_args()
    torch.set_num_threads(2)
    import transformers

    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=args.layers,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=1024,
                                      max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = ours_from_hf(transformers.AutoModelForCausalLM.from_config(config).eval().to(torch.bfloat16))
    config = EngineConfig(dtype="bfloat16", static_decode=True, kv_cache_bytes=64 * 1024**2, prefix_caching=False,
                          prefill_chunk_size=max(512, args.prompt))
    engine = LLMEngine(model, config,
                       stand_in_tokenizer(1024))
    print(f"kernel launches, one request, {args.layers} layers, bfloat16: its prefill of {args.prompt} tokens (eager) "
          "and a decode step (static step, Triton decode attention)")
    for name, triton_layer_ops in (("PyTorch layer ops", False), ("Triton layer ops", True)):
        for step, counts in zip(("prefill", "decode"), step_launches(engine, triton_layer_ops, args.prompt)):
            total = sum(counts.values())
            print(f"{name}, {step}: {total} launches, {total / args.layers:.1f} per layer")
            print("   " + ", ".join(f"{op} {n}" for op, n in counts.most_common()))


if __name__ == "__main__":
    main()
