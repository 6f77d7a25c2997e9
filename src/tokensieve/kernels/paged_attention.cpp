// Decode attention that reads keys and values where they lie in the block pool.
//
// Each (sequence, KV head) has its own block list and length. paged_scores computes, for the G query
// heads sharing that KV head, q . k * scale for every stored entry (-inf past the length);
// after a softmax, paged_weighted_values sums p * v. No copy of the cache is made. Scores are taken 16
// entries at a time (one horizontal sum for all 16), and value vectors are loaded once for several
// queries; a query's result never depends on the other queries in the call, so a row verified in a
// draft tree gets exactly what it would get decoded alone.
//
// A sequence verifying a draft tree has one "slot" per node (its G query heads are slots x heads
// per slot); the tree's own entries are the last block_rows[seq] of each head, and slot s sees
// entry t of them only if block_visibility[seq][s][t] (a node sees its ancestors, not its siblings).
#include "kernels.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <limits>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// f(std::integral_constant<int, V>{}) where dim = 16 V with V in 1..8 and AVX-512 is there (true);
// else nothing is called (false) and the caller runs its scalar loop.
template <typename F>
bool with_vectors([[maybe_unused]] int64_t dim, [[maybe_unused]] F&& f) {
#if defined(__AVX512F__)
  switch (dim % 16 == 0 ? dim / 16 : 0) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 3: f(std::integral_constant<int, 3>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 5: f(std::integral_constant<int, 5>{}); return true;
    case 6: f(std::integral_constant<int, 6>{}); return true;
    case 7: f(std::integral_constant<int, 7>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
  }
#endif
  return false;
}

// Queries one vectorized weighted-sum pass carries: V vectors of sums each, 24 registers in all.
constexpr int queries_per_pass(int V) { return 24 / V; }

#if defined(__AVX512F__)
// One vector whose lane e is the sum of the lanes of acc[e]: halves, then quarters, then pairs are
// added, in a tree that is the same for every lane, so an entry's dot does not depend on its neighbours.
inline __m512 sum_lanes_of_16(const __m512 (&acc)[16]) {
  __m512 halves[8], quarters[4], pairs[2];
  for (int j = 0; j < 8; ++j)  // lanes 0-7: entry 2j, lanes 8-15: entry 2j+1
    halves[j] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * j], acc[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_f32x4(acc[2 * j], acc[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int j = 0; j < 4; ++j)  // 128-bit lane k: entry 4j+k
    quarters[j] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * j], halves[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_f32x4(halves[2 * j], halves[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int j = 0; j < 2; ++j)  // 128-bit lane k: entries 8j+k (two partials), then 8j+4+k
    pairs[j] = _mm512_add_ps(_mm512_shuffle_ps(quarters[2 * j], quarters[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(quarters[2 * j], quarters[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // lane 4k+m holds entry 4m+k
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), sums);
}

// out[e] = query . keys[e] for n <= 16 entries lying one after another, dim = 16 V.
template <int V>
void dots(const float* query, const float* keys, int64_t n, float* out) {
  __m512 q[V], acc[16];
  for (int v = 0; v < V; ++v) q[v] = _mm512_loadu_ps(query + 16 * v);
  for (int e = 0; e < 16; ++e) acc[e] = _mm512_setzero_ps();
  for (int64_t e = 0; e < n; ++e)
    for (int v = 0; v < V; ++v) acc[e] = _mm512_fmadd_ps(q[v], _mm512_loadu_ps(keys + e * 16 * V + 16 * v), acc[e]);
  alignas(64) float sums[16];
  _mm512_store_ps(sums, sum_lanes_of_16(acc));
  std::copy(sums, sums + n, out);
}
#endif

inline void dots_any(const float* query, const float* keys, int64_t n, int64_t dim, float* out) {
#if defined(__AVX512F__)
  if (with_vectors(dim, [&](auto v) { dots<decltype(v)::value>(query, keys, n, out); })) return;
#endif
  for (int64_t e = 0; e < n; ++e) {
    float sum = 0.f;
    for (int64_t i = 0; i < dim; ++i) sum += query[i] * keys[e * dim + i];
    out[e] = sum;
  }
}

// f(first, n, rows) for runs of n <= 16 entries of one (sequence, KV head) from `first` to `end`, rows
// pointing at the run's first vector in the pool: entries lie one after another within a block.
template <typename F>
inline void for_each_run(const float* pool, const int64_t* blocks, int64_t block_size, int64_t dim, int64_t first,
                         int64_t end, F&& f) {
  constexpr int64_t kMaxRun = 16;
  for (int64_t i = first; i < end;) {
    const int64_t in_block = i % block_size, n = std::min({end - i, block_size - in_block, kMaxRun});
    f(i, n, pool + (blocks[i / block_size] * block_size + in_block) * dim);
    i += n;
  }
}

// out[q][0..dim) = sum over the first `length` entries of p[q][i] * value(i), entry after entry, for
// nq <= queries_per_pass(V) queries at once (dim = 16 V), their sums in registers: each value
// vector is loaded once for all of them. A query's sums do not depend on the others in the pass.
#if defined(__AVX512F__)
template <int V>
void weighted_sums(const float* p, int64_t p_stride, int64_t nq, const float* values, const int64_t* blocks,
                   int64_t length, int64_t block_size, float* out) {
  constexpr int Q = queries_per_pass(V);
  __m512 sum[Q][V];
  for (int q = 0; q < Q; ++q)
    for (int v = 0; v < V; ++v) sum[q][v] = _mm512_setzero_ps();
  for_each_run(values, blocks, block_size, 16 * V, 0, length, [&](int64_t first, int64_t n, const float* rows) {
    for (int64_t e = 0; e < n; ++e) {
      __m512 value[V];
      for (int v = 0; v < V; ++v) value[v] = _mm512_loadu_ps(rows + e * 16 * V + 16 * v);
      for (int q = 0; q < Q; ++q) {
        if (q >= nq) break;
        const __m512 weight = _mm512_set1_ps(p[q * p_stride + first + e]);
        for (int v = 0; v < V; ++v) sum[q][v] = _mm512_fmadd_ps(weight, value[v], sum[q][v]);
      }
    }
  });
  for (int q = 0; q < nq; ++q)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + (q * V + v) * 16, sum[q][v]);
}
#endif

// The same for any dim, one query at a time, without vectors.
void weighted_sums_scalar(const float* p, int64_t p_stride, int64_t nq, const float* values, const int64_t* blocks,
                          int64_t length, int64_t block_size, int64_t dim, float* out) {
  std::fill(out, out + nq * dim, 0.f);
  for (int64_t q = 0; q < nq; ++q)
    for_each_run(values, blocks, block_size, dim, 0, length, [&](int64_t first, int64_t n, const float* rows) {
      for (int64_t e = 0; e < n; ++e)
        for (int64_t d = 0; d < dim; ++d) out[q * dim + d] += p[q * p_stride + first + e] * rows[e * dim + d];
    });
}

void weighted_sums_any(const float* p, int64_t p_stride, int64_t nq, const float* values, const int64_t* blocks,
                       int64_t length, int64_t block_size, int64_t dim, float* out) {
#if defined(__AVX512F__)
  if (with_vectors(dim, [&](auto v) { weighted_sums<decltype(v)::value>(p, p_stride, nq, values, blocks, length, block_size, out); }))
    return;
#endif
  weighted_sums_scalar(p, p_stride, nq, values, blocks, length, block_size, dim, out);
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
      float dot_products[16];
      for_each_run(kp, blocks, L.block_size, L.dim, first, stored_end, [&](int64_t run_first, int64_t n, const float* keys) {
        for (int64_t g = 0; g < L.group; ++g) {
          dots_any(queries + g * L.dim, keys, n, L.dim, dot_products);
          const bool* sees = has_blocks ? visibility + (seq * slots + g / heads_per_slot) * slots : nullptr;
          for (int64_t e = 0, i = run_first; e < n; ++e, ++i)
            out[g * max_entries + i] = i < block_start || sees[i - block_start]
                                           ? dot_products[e] * fscale
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
  auto out = torch::empty({L.batch, L.kv_heads, L.group, L.dim}, probs.options());
  const float* pp = probs.data_ptr<float>();
  const float* vp = value_pool.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = lengths.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  // work units: (sequence, KV head, a pass's queries of the group), at least four per thread when there are
  const int64_t items = L.batch * L.kv_heads, threads = at::get_num_threads();
  int64_t most_per_pass = 1;
  with_vectors(L.dim, [&](auto v) { most_per_pass = queries_per_pass(decltype(v)::value); });
  const int64_t per_pass = std::clamp<int64_t>(items * L.group / (4 * threads), 1, most_per_pass);
  const int64_t passes = (L.group + per_pass - 1) / per_pass;
  at::parallel_for(0, items * passes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t item = unit / passes, query = (unit % passes) * per_pass;
      const int64_t nq = std::min(per_pass, L.group - query), row = item * L.group + query;
      weighted_sums_any(pp + row * max_entries, max_entries, nq, vp, tables + item * L.max_blocks, lens[item],
                        L.block_size, L.dim, op + row * L.dim);
    }
  });
  return out;
}
