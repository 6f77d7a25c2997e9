"""What the host spends on a decode step besides the model: scheduling, packing the static step's inputs,
sampling, and turning tokens into outputs (detokenising, stop checks), by batch size, on a model small
enough that its forward is cheap. On a GPU this is what bounds decoding once the forward is a graph
replay: the host work of a step does not overlap the device's.

    PYTHONPATH=src .venv/bin/python benchmarks/scripts/host_overhead.py --batches 1 32
    PYTHONPATH=src .venv/bin/python benchmarks/scripts/host_overhead.py --batches 1 32 --no-forward

`--no-forward` takes the forward off the CPU, as a GPU does: decode steps return ready logits (whose
best token is an ordinary one, as a text's would be), so the step is the host's work alone, without
the forward's matmuls evicting the host's data from the CPU's caches between steps.
"""

import argparse
import time

import torch
from step_cost import timed  # this folder's: a function that adds its seconds up by label

from tokensieve import SamplingParams
from tokensieve.bench.model_shapes import build_shape
from tokensieve.config import EngineConfig
from tokensieve.engine import engine as engine_module
from tokensieve.engine.engine import LLMEngine


LABELS = ("schedule", "static step (on CUDA the forward is only launched)", "of which packing its inputs",
          "sample (on CUDA it waits for the forward)", "outputs", "prefix cache")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--no-forward", action="store_true", help="decode steps return ready logits")
    args = parser.parse_args()
    torch.set_num_threads(2)
    shape = build_shape(args.shape, torch.float32, args.device)
    config = EngineConfig(device=args.device, max_num_seqs=max(args.batches), kv_cache_bytes=512 * 1024**2, static_decode=True)
    engine = LLMEngine(shape.ours, config, shape.tokenizer)
    seconds: dict[str, float] = {}
    decoder = engine.runner.static_decoder
    if args.no_forward:
        ready = torch.zeros(max(args.batches), shape.ours.config.vocab_size)
        ready[:, shape.tokenizer.encode(" the", add_special_tokens=False)[0]] = 1.0
        decoder._forward = lambda inputs, width: ready[: inputs.batch * inputs.rows]
    for label, (owner, name) in zip(LABELS, [(engine.scheduler, "schedule"), (decoder, "forward"), (decoder, "_pack"),
                                             (engine_module, "sample_tokens"), (engine, "_append_tokens"),
                                             (engine.scheduler, "cache_computed")]):
        setattr(owner, name, timed(seconds, label, getattr(owner, name)))
    forward = "no forward (ready logits)" if args.no_forward else "static decode"
    print(f"{args.shape} shape on {args.device}, {forward}, context {args.context}; ms per step")
    for batch in args.batches:
        generator = torch.Generator().manual_seed(batch)
        params = SamplingParams(max_tokens=args.steps + 10, temperature=0, ignore_eos=True)
        ids = [engine.add_request(torch.randint(100, 40000, (args.context,), generator=generator).tolist(), params)
               for _ in range(batch)]
        while len(engine.scheduler.running) < batch or any(s.num_unprocessed > 1 for s in engine.scheduler.running):
            engine.step()  # the prefills (several steps at large batches)
        for _ in range(3):  # decode steps (graphs captured)
            engine.step()
        seconds.clear()
        began = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        step = (time.perf_counter() - began) / args.steps
        parts = ", ".join(f"{label} {seconds[label] / args.steps * 1e3:.3f}" for label in LABELS if label in seconds)
        print(f"batch {batch}: step {step * 1e3:.3f} ({parts})")
        for request_id in ids:
            engine.abort(request_id)


if __name__ == "__main__":
    main()
