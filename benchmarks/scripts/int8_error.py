"""How far int8 activations move a matmul from float32 activations, on the default model's own
GGUF blocks: relative error ||int8 - float32|| / ||float32|| for random rows and for the hidden
states of a real prompt (the rows that enter layer 0's projections and the lm_head):

    .venv/bin/python benchmarks/scripts/int8_error.py
"""

import torch

from tokensieve import LLM
from tokensieve.models.int8_weight import Int8Weight


def main() -> None:
    torch.set_num_threads(2)
    llm = LLM("smollm2-135m", activations="float32")  # the reference: int8 is what it measures
    model, kernels = llm.engine.model, llm.engine.kernels
    ids = torch.tensor(llm.encode([{"role": "user", "content": "Explain in three sentences why the sky is blue."}]))
    with torch.inference_mode():
        hidden = model.layers[0].input_layernorm(model.embed_tokens(ids))
        final = model.norm(model.embed_tokens(ids))
    cases = {"layer 0 qkv_proj": (model.layers[0].self_attn.qkv_proj, hidden),
             "layer 0 gate_up_proj": (model.layers[0].mlp.gate_up_proj, hidden),
             "lm_head": (model.lm_head, final)}
    print("| linear | rows | random rows | prompt rows |\n|---|---:|---:|---:|")
    for name, (linear, rows) in cases.items():
        packed = Int8Weight.pack(linear.native)
        errors = []
        for x in (torch.randn(rows.shape, generator=torch.Generator().manual_seed(0)), rows):
            exact = linear.native.matmul(x, kernels)
            errors.append(((packed.matmul(x, kernels) - exact).norm() / exact.norm()).item())
        print(f"| {name} | {rows.shape[0]} | {errors[0]:.2%} | {errors[1]:.2%} |")


if __name__ == "__main__":
    main()
