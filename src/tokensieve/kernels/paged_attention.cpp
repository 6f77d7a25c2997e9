// Decode attention that reads keys and values where they lie in the block pool.
//
// Each (sequence, KV head) has its own block list and length. paged_scores computes, for the G query
// heads sharing that KV head, q . k * scale for every stored entry (-inf past the length);
// after a softmax, paged_weighted_values sums p * v. No copy of the cache is made.
//
// A sequence verifying a draft tree has one "slot" per node (its G query heads are slots x heads
// per slot); the tree's own entries are the last block_rows[seq] of each head, and slot s sees
// entry t of them only if block_visibility[seq][s][t] (a node sees its ancestors, not its siblings).
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

// f(i, row) for entries first..end-1 of one (sequence, KV head), row pointing at entry i's vector in
// the pool: block by block, since entries lie contiguous within a block.
template <typename F>
inline void for_each_entry(const float* pool, const int64_t* blocks, int64_t block_size, int64_t dim, int64_t first,
                           int64_t end, F&& f) {
  for (int64_t i = first; i < end;) {
    const int64_t in_block = i % block_size, block_end = std::min(end, i + block_size - in_block);
    const float* row = pool + (blocks[i / block_size] * block_size + in_block) * dim;
    for (; i < block_end; ++i, row += dim) f(i, row);
  }
}

// acc[0..dim) = sum over the first `length` entries of p[i] * value(i), entry after entry.
inline void weighted_sum(const float* __restrict__ p, const float* __restrict__ values, const int64_t* blocks,
                         int64_t length, int64_t block_size, int64_t dim, float* __restrict__ acc) {
#if defined(__AVX512F__)
  constexpr int kMaxVectors = 16;
  if (dim % 16 == 0 && dim / 16 <= kMaxVectors) {  // the sums stay in registers
    const int64_t vectors = dim / 16;
    __m512 sum[kMaxVectors];
    for (int64_t v = 0; v < vectors; ++v) sum[v] = _mm512_setzero_ps();
    for_each_entry(values, blocks, block_size, dim, 0, length, [&](int64_t i, const float* row) {
      const __m512 weight = _mm512_set1_ps(p[i]);
      for (int64_t v = 0; v < vectors; ++v)  // multiply, then add: the rounding of the scalar loop below
        sum[v] = _mm512_add_ps(sum[v], _mm512_mul_ps(weight, _mm512_loadu_ps(row + 16 * v)));
    });
    for (int64_t v = 0; v < vectors; ++v) _mm512_storeu_ps(acc + 16 * v, sum[v]);
    return;
  }
#endif
  for_each_entry(values, blocks, block_size, dim, 0, length, [&](int64_t i, const float* row) {
    for (int64_t d = 0; d < dim; ++d) acc[d] += p[i] * row[d];
  });
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
                           double scale, torch::Tensor block_visibility, torch::Tensor block_rows) {
  const Layout L = check(q, key_pool, block_tables, lengths);
  const bool has_blocks = block_visibility.numel() > 0;
  int64_t slots = 1;
  if (has_blocks) {
    TORCH_CHECK(block_visibility.scalar_type() == torch::kBool && block_visibility.is_contiguous() && block_visibility.dim() == 3 &&
                    block_visibility.size(0) == L.batch && block_visibility.size(1) == block_visibility.size(2) &&
                    L.group % block_visibility.size(1) == 0,
                "block_visibility must be a contiguous bool [batch, slots, slots] tensor");
    TORCH_CHECK(block_rows.scalar_type() == torch::kInt64 && block_rows.numel() == L.batch, "block_rows must be int64 [batch]");
    slots = block_visibility.size(1);
  }
  const bool* visibility = has_blocks ? block_visibility.data_ptr<bool>() : nullptr;
  const int64_t* rows = has_blocks ? block_rows.data_ptr<int64_t>() : nullptr;
  const int64_t heads_per_slot = L.group / slots;
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
      const int64_t length = lens[item], seq = item / L.kv_heads;
      const int64_t block_start = has_blocks ? length - rows[seq] : length;
      const int64_t* blocks = tables + item * L.max_blocks;
      const float* queries = qp + item * L.group * L.dim;
      float* out = sp + item * L.group * max_entries;
      const int64_t stored_end = std::min(last, length);
      for (int64_t i = stored_end; i < last; ++i)
        for (int64_t g = 0; g < L.group; ++g) out[g * max_entries + i] = -std::numeric_limits<float>::infinity();
      for_each_entry(kp, blocks, L.block_size, L.dim, first, stored_end, [&](int64_t i, const float* key) {
        for (int64_t g = 0; g < L.group; ++g) {
          const bool seen = i < block_start || visibility[(seq * slots + g / heads_per_slot) * slots + i - block_start];
          out[g * max_entries + i] = seen ? dot(queries + g * L.dim, key, L.dim) * fscale
                                          : -std::numeric_limits<float>::infinity();
        }
      });
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
      const int64_t* blocks = tables + item * L.max_blocks;
      weighted_sum(pp + unit * max_entries, vp, blocks, lens[item], L.block_size, L.dim, op + unit * L.dim);
    }
  });
  return out;
}
