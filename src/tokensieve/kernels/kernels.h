#pragma once
#include <torch/extension.h>

// GGUF's quantized blocks, as the matmul kernels take them: 32 weights each, of one of these kinds
// (the ids models/quantized.py passes).
namespace gguf {
constexpr int kBlock = 32;
enum Kind { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };
}  // namespace gguf

torch::Tensor quantized_matmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor mins,
                               int64_t kind);
torch::Tensor int8_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, torch::Tensor mins,
                          int64_t kind, int64_t out_features);
torch::Tensor paged_scores(torch::Tensor q, torch::Tensor key_pool, torch::Tensor block_tables, torch::Tensor lengths,
                           double scale, torch::Tensor row_of_slot, torch::Tensor block_visibility,
                           torch::Tensor block_rows);
torch::Tensor paged_softmax_values(torch::Tensor scores, torch::Tensor value_pool, torch::Tensor block_tables,
                                   torch::Tensor lengths, torch::Tensor row_of_slot, torch::Tensor block_rows,
                                   int64_t num_rows);
torch::Tensor paged_scores_quantized(torch::Tensor q, torch::Tensor key_codes, torch::Tensor key_scale, torch::Tensor key_zero,
                                     torch::Tensor staging_of, torch::Tensor staging_keys, int64_t bits, torch::Tensor block_tables,
                                     torch::Tensor lengths, double scale, torch::Tensor row_of_slot, torch::Tensor block_visibility,
                                     torch::Tensor block_rows);
torch::Tensor paged_softmax_values_quantized(torch::Tensor scores, torch::Tensor value_codes, torch::Tensor value_scale,
                                             torch::Tensor value_zero, torch::Tensor staging_of, torch::Tensor staging_values,
                                             int64_t bits, torch::Tensor block_tables, torch::Tensor lengths,
                                             torch::Tensor row_of_slot, torch::Tensor block_rows, int64_t num_rows);
void quantize_into(torch::Tensor source, torch::Tensor source_ids, torch::Tensor codes, torch::Tensor scale, torch::Tensor zero,
                   torch::Tensor destination_ids, int64_t bits);
torch::Tensor top_tokens(torch::Tensor logits, int64_t k);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_mul(torch::Tensor gate_up);
void widen_key_bounds(torch::Tensor key_min, torch::Tensor key_max, torch::Tensor slots, torch::Tensor keys,
                      int64_t block_size);
std::vector<torch::Tensor> select_blocks(torch::Tensor q, torch::Tensor key_min, torch::Tensor key_max,
                                         torch::Tensor block_tables, torch::Tensor lengths, torch::Tensor budget_blocks,
                                         int64_t block_size, torch::Tensor keys, int64_t shortlist);
void store_kv(torch::Tensor key_pool, torch::Tensor value_pool, torch::Tensor slots, torch::Tensor keys,
              torch::Tensor values);
