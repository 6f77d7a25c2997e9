// Quest's block selection for decoding (engine/block_selection.py has the same rule in PyTorch):
//
// widen_key_bounds: after keys are written to their flat slots, each block's per-dimension key min and
//                   max cover them; a block whose first entry is written starts over.
// select_blocks:    for each (sequence, KV head), the blocks a decoding query attends to: those whose bound
//                   sum_d max(q_d * min_d, q_d * max_d) (the largest over the query heads sharing the KV
//                   head) is highest, the first and the last block always (the last first of all), in
//                   their original order; with no more blocks than the budget, all of them. Returns the
//                   chosen block ids, the new lengths, and the chosen blocks' places in the tables.
//                   With a shortlist factor f > 0, the bounds only shortlist f times the blocks to choose
//                   between the first and the last; each shortlisted block then scores by the largest
//                   q . k / sqrt(dim) over its keys, softmax-normalised over the shortlist per query head and
//                   summed over the group, and the best of those are chosen.
#include "kernels.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#endif

// max over the group's query heads of sum_d max(q_d * lo_d, q_d * hi_d); queries [group] rows of `dim` floats
// `stride` apart
template <typename T>
float block_bound(const float* queries, int64_t stride, int64_t group, const T* lo, const T* hi, int64_t dim) {
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t g = 0; g < group; ++g) {
    const float* q = queries + g * stride;
    float sum = 0.f;
    int64_t d = 0;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= dim; d += 16) {
      const __m512 qv = _mm512_loadu_ps(q + d);
      acc = _mm512_add_ps(acc, _mm512_max_ps(_mm512_mul_ps(qv, load16(lo + d)), _mm512_mul_ps(qv, load16(hi + d))));
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; d < dim; ++d) sum += std::max(q[d] * static_cast<float>(lo[d]), q[d] * static_cast<float>(hi[d]));
    best = std::max(best, sum);
  }
  return best;
}

// largest q . k over the `block_size` keys of a block laid out dimension-major ([dim][block_size])
template <typename T>
float best_score(const float* q, const T* keys, int64_t dim, int64_t block_size) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t e = 0;
#if defined(__AVX512F__)
  for (; e + 16 <= block_size; e += 16) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; ++d) acc = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), load16(keys + d * block_size + e), acc);
    best = std::max(best, _mm512_reduce_max_ps(acc));
  }
#endif
  for (; e < block_size; ++e) {
    float sum = 0.f;
    for (int64_t d = 0; d < dim; ++d) sum += q[d] * static_cast<float>(keys[d * block_size + e]);
    best = std::max(best, sum);
  }
  return best;
}

// add each shortlisted block's score to `score` (zeros): per query head, its best key score softmax-normalised
// over the shortlist, summed over the group
template <typename T>
void shortlist_scores(const float* queries, int64_t stride, int64_t group, const T* keys, const int64_t* blocks,
                      const std::vector<int64_t>& shortlist, int64_t dim, int64_t block_size, std::vector<float>& score) {
  const float scale = 1.f / std::sqrt(static_cast<float>(dim));
  std::vector<float> best(shortlist.size());
  for (int64_t g = 0; g < group; ++g) {
    float top = -std::numeric_limits<float>::infinity(), total = 0.f;
    for (size_t i = 0; i < shortlist.size(); ++i) {
      best[i] = scale * best_score(queries + g * stride, keys + blocks[shortlist[i]] * dim * block_size, dim, block_size);
      top = std::max(top, best[i]);
    }
    for (size_t i = 0; i < shortlist.size(); ++i) total += best[i] = std::exp(best[i] - top);
    for (size_t i = 0; i < shortlist.size(); ++i) score[shortlist[i]] += best[i] / total;
  }
}

template <typename F>
void with_bounds_type(const torch::Tensor& bounds, F&& f) {
  if (bounds.scalar_type() == torch::kFloat16)
    f(static_cast<at::Half*>(nullptr));
  else
    f(static_cast<float*>(nullptr));
}

}  // namespace

void widen_key_bounds(torch::Tensor key_min, torch::Tensor key_max, torch::Tensor slots, torch::Tensor keys,
                      int64_t block_size) {
  TORCH_CHECK((key_min.scalar_type() == torch::kFloat32 || key_min.scalar_type() == torch::kFloat16) &&
                  key_max.scalar_type() == key_min.scalar_type() && key_min.is_contiguous() && key_max.is_contiguous(),
              "key bounds must be contiguous float32 or float16 [blocks, dim]");
  const int64_t dim = key_min.size(1);
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous(), "slots must be contiguous int64");
  TORCH_CHECK(keys.scalar_type() == torch::kFloat32 && keys.dim() == 3 && keys.size(2) == dim && keys.stride(2) == 1 &&
                  keys.size(0) * keys.size(1) == slots.numel(),
              "keys must be float32 [tokens, kv_heads, dim] with unit stride in dim, one slot each");
  const int64_t heads = keys.size(1);
  const int64_t* slot = slots.data_ptr<int64_t>();
  with_bounds_type(key_min, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    T* low = reinterpret_cast<T*>(key_min.data_ptr());
    T* high = reinterpret_cast<T*>(key_max.data_ptr());
    for (int64_t i = 0; i < slots.numel(); ++i) {
      const float* k = keys.data_ptr<float>() + (i / heads) * keys.stride(0) + (i % heads) * keys.stride(1);
      T* lo = low + (slot[i] / block_size) * dim;
      T* hi = high + (slot[i] / block_size) * dim;
      const bool starts = slot[i] % block_size == 0;
      for (int64_t d = 0; d < dim; ++d) {
        const float v = static_cast<float>(static_cast<T>(k[d]));  // as the pool stores it
        lo[d] = starts ? static_cast<T>(v) : static_cast<T>(std::min(static_cast<float>(lo[d]), v));
        hi[d] = starts ? static_cast<T>(v) : static_cast<T>(std::max(static_cast<float>(hi[d]), v));
      }
    }
  });
}

std::vector<torch::Tensor> select_blocks(torch::Tensor q, torch::Tensor key_min, torch::Tensor key_max,
                                         torch::Tensor block_tables, torch::Tensor lengths, torch::Tensor budget_blocks,
                                         int64_t block_size, torch::Tensor keys, int64_t shortlist) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.dim() == 3 && q.stride(2) == 1, "q must be float32 [seqs, heads, dim]");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && block_tables.dim() == 3 && block_tables.is_contiguous(),
              "block tables must be contiguous int64 [seqs, kv_heads, blocks]");
  auto lens = lengths.contiguous(), budgets = budget_blocks.contiguous();
  const int64_t seqs = block_tables.size(0), kv_heads = block_tables.size(1), width = block_tables.size(2);
  const int64_t dim = q.size(2), group = q.size(1) / kv_heads;
  TORCH_CHECK(q.size(0) == seqs && q.size(1) == group * kv_heads && key_min.size(1) == dim, "shapes disagree");
  TORCH_CHECK(shortlist == 0 || (keys.scalar_type() == key_min.scalar_type() && keys.is_contiguous() && keys.dim() == 3 &&
                                  keys.size(1) == dim && keys.size(2) == block_size),
              "shortlist rescoring needs the pool's contiguous keys [blocks, dim, block_size] in the bounds' dtype");
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(width, budgets.max().item<int64_t>()));
  auto selected = torch::zeros({seqs, kv_heads, most}, block_tables.options());
  auto positions = torch::zeros({seqs, kv_heads, most}, block_tables.options());  // the chosen blocks' places in the table
  auto new_lengths = torch::empty_like(lens);
  const int64_t* table = block_tables.data_ptr<int64_t>();
  const int64_t* length = lens.data_ptr<int64_t>();
  const int64_t* budget = budgets.data_ptr<int64_t>();
  int64_t* out = selected.data_ptr<int64_t>();
  int64_t* out_index = positions.data_ptr<int64_t>();
  int64_t* out_length = new_lengths.data_ptr<int64_t>();
  with_bounds_type(key_min, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    const T* low = reinterpret_cast<const T*>(key_min.data_ptr());
    const T* high = reinterpret_cast<const T*>(key_max.data_ptr());
    const T* key = shortlist ? reinterpret_cast<const T*>(keys.data_ptr()) : nullptr;
    at::parallel_for(0, seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> bound, score;
      std::vector<int64_t> order;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t s = p / kv_heads, h = p % kv_heads;
        const int64_t* blocks = table + p * width;
        const int64_t n = (length[p] + block_size - 1) / block_size;
        const int64_t k = std::max<int64_t>(1, std::min(budget[p], n));
        int64_t* dest = out + p * most;
        int64_t* dest_index = out_index + p * most;
        if (k >= n) {
          std::copy(blocks, blocks + n, dest);
          std::iota(dest_index, dest_index + n, 0);
          out_length[p] = length[p];
          continue;
        }
        bound.assign(n, 0.f);
        const float* queries = q.data_ptr<float>() + s * q.stride(0) + h * group * q.stride(1);
        for (int64_t b = 1; b + 1 < n; ++b)
          bound[b] = block_bound(queries, q.stride(1), group, low + blocks[b] * dim, high + blocks[b] * dim, dim);
        order.resize(n - 2);
        std::iota(order.begin(), order.end(), 1);  // the blocks between the first and the last
        const int64_t middle = std::max<int64_t>(0, k - 2);
        const int64_t listed = shortlist ? std::min<int64_t>(n - 2, middle * shortlist) : middle;
        std::partial_sort(order.begin(), order.begin() + listed, order.end(),
                          [&](int64_t a, int64_t b) { return bound[a] > bound[b] || (bound[a] == bound[b] && a < b); });
        order.resize(listed);
        if (listed > middle) {  // the exact scores choose among the shortlist
          score.assign(n, 0.f);
          shortlist_scores(queries, q.stride(1), group, key, blocks, order, dim, block_size, score);
          std::partial_sort(order.begin(), order.begin() + middle, order.end(),
                            [&](int64_t a, int64_t b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
          order.resize(middle);
        }
        std::sort(order.begin(), order.end());
        if (k >= 2) order.insert(order.begin(), 0);
        order.push_back(n - 1);
        for (size_t i = 0; i < order.size(); ++i) {
          dest[i] = blocks[order[i]];
          dest_index[i] = order[i];
        }
        out_length[p] = (k - 1) * block_size + length[p] - (n - 1) * block_size;
      }
    });
  });
  return {selected, new_lengths, positions};
}
