#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantized_matmul", &quantized_matmul, "x @ W^T with W in GGUF blocks (Q4_0, Q4_1, Q8_0)");
  m.def("int8_matmul", &int8_matmul, "x @ W^T with x quantized to int8 per 32-block, W in repacked GGUF blocks");
  m.def("paged_scores", &paged_scores, "q . k for every stored entry of each (sequence, KV head), read in place");
  m.def("paged_softmax_values", &paged_softmax_values, "softmax of the scores times v over the stored entries, read in place");
  m.def("paged_scores_quantized", &paged_scores_quantized, "paged_scores over a pool of int8 or int4 blocks and their float staging");
  m.def("paged_softmax_values_quantized", &paged_softmax_values_quantized,
        "paged_softmax_values over a pool of int8 or int4 blocks and their float staging");
  m.def("quantize_into", &quantize_into, "quantize blocks of a float32 pool into codes, float16 scales and zeros (KIVI)");
  m.def("rms_norm", &rms_norm, "x * rsqrt(mean(x^2) + eps) * weight over the last dim");
  m.def("rotary", &rotary, "x * cos + rotate_half(x) * sin for x [tokens, heads, dim]");
  m.def("silu_mul", &silu_mul, "silu(gate) * up for gate_up [rows, 2 * intermediate] (gate first)");
  m.def("store_kv", &store_kv, "write keys and values [tokens, kv_heads, dim] to their flat slots in the block pools");
  m.def("widen_key_bounds", &widen_key_bounds, "widen each written block's per-dimension key min and max to its new keys");
  m.def("select_blocks", &select_blocks, "Quest: the blocks of each (sequence, KV head) a decoding query attends to");
  m.def("top_tokens", &top_tokens, "the k largest logits of each row as token ids, best first, ties to the lower id");
}
