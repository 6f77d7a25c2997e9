// Decode attention that reads keys and values where they lie in the block pool.
//
// Each (sequence, KV head) has its own block list and length. paged_scores computes, for the G query
// heads sharing that KV head, q . k * scale for every stored entry (-inf past the length);
// after a softmax, paged_weighted_values sums p * v. No copy of the cache is made.
#include "kernels.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <limits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
#if defined(__AVX512F__)
  if (n % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

struct Layout {
  int64_t batch, kv_heads, group, dim, block_size, max_blocks;
};

Layout check(const torch::Tensor& per_head, const torch::Tensor& pool, const torch::Tensor& block_tables,
             const torch::Tensor& lengths) {
  TORCH_CHECK(per_head.dim() == 4 && per_head.scalar_type() == torch::kFloat32 && per_head.is_contiguous(),
              "expected a contiguous float32 [batch, kv_heads, group, *] tensor");
  TORCH_CHECK(pool.scalar_type() == torch::kFloat32 && pool.is_contiguous() && pool.dim() == 3, "pool must be float32 [blocks, block_size, dim]");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && block_tables.is_contiguous(), "block_tables must be contiguous int64");
  TORCH_CHECK(lengths.scalar_type() == torch::kInt64 && lengths.is_contiguous(), "lengths must be contiguous int64");
  return {per_head.size(0), per_head.size(1), per_head.size(2), pool.size(2), pool.size(1), block_tables.size(2)};
}

}  // namespace

torch::Tensor paged_scores(torch::Tensor q, torch::Tensor key_pool, torch::Tensor block_tables, torch::Tensor lengths,
                           double scale) {
  const Layout L = check(q, key_pool, block_tables, lengths);
  const int64_t max_entries = L.max_blocks * L.block_size;
  auto scores = torch::empty({L.batch, L.kv_heads, L.group, max_entries}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = key_pool.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = lengths.data_ptr<int64_t>();
  float* sp = scores.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  // work units: (sequence, KV head, run of entries), so that one long sequence still uses every thread
  constexpr int64_t kEntriesPerUnit = 256;
  const int64_t runs = (max_entries + kEntriesPerUnit - 1) / kEntriesPerUnit;
  at::parallel_for(0, L.batch * L.kv_heads * runs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t item = unit / runs, first = (unit % runs) * kEntriesPerUnit;
      const int64_t last = std::min(first + kEntriesPerUnit, max_entries);
      const int64_t length = lens[item];
      const int64_t* blocks = tables + item * L.max_blocks;
      for (int64_t i = first; i < last; ++i) {
        float* row = sp + item * L.group * max_entries + i;
        if (i >= length) {
          for (int64_t g = 0; g < L.group; ++g) row[g * max_entries] = -std::numeric_limits<float>::infinity();
          continue;
        }
        const float* key = kp + (blocks[i / L.block_size] * L.block_size + i % L.block_size) * L.dim;
        for (int64_t g = 0; g < L.group; ++g)
          row[g * max_entries] = dot(qp + (item * L.group + g) * L.dim, key, L.dim) * fscale;
      }
    }
  });
  return scores;
}

torch::Tensor paged_weighted_values(torch::Tensor probs, torch::Tensor value_pool, torch::Tensor block_tables,
                                    torch::Tensor lengths) {
  const Layout L = check(probs, value_pool, block_tables, lengths);
  const int64_t max_entries = probs.size(3);
  auto out = torch::zeros({L.batch, L.kv_heads, L.group, L.dim}, probs.options());
  const float* pp = probs.data_ptr<float>();
  const float* vp = value_pool.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = lengths.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  // work units: (sequence, KV head, query head of the group)
  at::parallel_for(0, L.batch * L.kv_heads * L.group, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t item = unit / L.group;
      const int64_t length = lens[item];
      const int64_t* blocks = tables + item * L.max_blocks;
      const float* p = pp + unit * max_entries;
      float* acc = op + unit * L.dim;
      for (int64_t i = 0; i < length; ++i) {
        const float* value = vp + (blocks[i / L.block_size] * L.block_size + i % L.block_size) * L.dim;
        for (int64_t d = 0; d < L.dim; ++d) acc[d] += p[i] * value[d];
      }
    }
  });
  return out;
}
