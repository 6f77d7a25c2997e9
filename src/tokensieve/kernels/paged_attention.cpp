// Decode attention that reads keys and values where they lie in the block pool (float32, or float16
// converted to float32 as they are loaded: half the bytes read at long context).
//
// Each (sequence, KV head) has its own block list and length. paged_scores computes, for the G query
// heads sharing that KV head, q . k * scale for every stored entry (-inf past the length);
// paged_softmax_values sums exp(s - max) * v and exp(s - max) entry after entry, then divides. No
// copy of the cache is made. A block's keys lie dimension-major ([dim, block_size]: dim d of every
// entry side by side), so 16 entries' scores are one vector, built by one multiply-add per dim with
// each key vector loaded once for 8 queries; value vectors are loaded once for several queries.
//
// A query's result never depends on the other queries in the call, nor on how many padding or hidden
// (-inf) entries lie among its entries: a hidden entry weighs exactly 0 and adds exactly nothing to
// sums taken in entry order. So a row verified in a draft tree, where its ancestors' entries lie among
// its siblings', gets bit for bit what it would get decoded alone.
//
// Queries are read, and outputs written, in the model's own [rows, heads, dim] layout: sequence b's
// slot s is row row_of_slot[b][s]. A decoding sequence has one slot; one verifying a draft tree has
// one per node (its G query heads are slots x heads per slot), padded to the batch's most slots by
// repeating its first row. The tree's own entries are the last block_rows[b] of each head, and slot s
// sees entry t of them only if block_visibility[b][s][t] (a node sees its ancestors, not its siblings).
#include "kernels.h"
#include "vector_math.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>
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

// f(std::integral_constant<int, N>{}) for n = N in 1..Most: a count chosen at compile time.
template <int Most, typename F>
inline void with_count(int64_t n, F&& f) {
  if constexpr (Most > 1)
    if (n < Most) return with_count<Most - 1>(n, f);
  f(std::integral_constant<int, Most>{});
}

// Queries one vectorized weighted-sum pass carries: V vectors of sums each, 24 registers in all.
constexpr int queries_per_pass(int V) { return 24 / V; }

// f(first, n, entry) for runs of n <= 16 entries of one (sequence, KV head) from `first` to `end`
// that lie in one block, entry pointing at the run's first entry in the pool: the next entry lies
// `dim` elements on (values: entry-major blocks) or 1 on (keys: dimension-major blocks).
template <typename T, typename F>
inline void for_each_run(const T* pool, const int64_t* blocks, int64_t block_size, int64_t dim, int64_t entry_stride,
                         int64_t first, int64_t end, F&& f) {
  constexpr int64_t kMaxRun = 16;
  for (int64_t i = first; i < end;) {
    const int64_t in_block = i % block_size, n = std::min({end - i, block_size - in_block, kMaxRun});
    f(i, n, pool + blocks[i / block_size] * block_size * dim + in_block * entry_stride);
    i += n;
  }
}

#if defined(__AVX512F__)
// The first n <= 16 elements at p as floats (0 in the other lanes), and 16 elements at p as floats.
inline __m512 load_lanes(const float* p, __mmask16 lanes) { return _mm512_maskz_loadu_ps(lanes, p); }
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_lanes(const c10::Half* p, __mmask16 lanes) {
#if defined(__AVX512BW__)
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, p));
#else
  alignas(64) float x[16];
  for (int e = 0; e < 16; ++e) x[e] = (lanes >> e) & 1 ? static_cast<float>(p[e]) : 0.f;
  return _mm512_load_ps(x);
#endif
}
inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#endif

// out[i][0..n) = (query i . key e) * scale for the n <= 16 entries of a run of dimension-major keys
// (dim d of entry e at keys[d * block_size + e]), for Q queries: one chain of multiply-adds over
// d = 0, 1, ... per score, so a score does not depend on the other queries or entries.
template <int Q, typename T>
inline void run_scores(const float* const* queries, const T* keys, int64_t block_size, int64_t dim, int64_t n,
                       float scale, float* const* out) {
#if defined(__AVX512F__)
  const __mmask16 lanes = static_cast<__mmask16>((1u << n) - 1);
  __m512 acc[Q];
  for (int i = 0; i < Q; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; ++d) {
    const __m512 key = load_lanes(keys + d * block_size, lanes);
    for (int i = 0; i < Q; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(queries[i][d]), key, acc[i]);
  }
  for (int i = 0; i < Q; ++i) _mm512_mask_storeu_ps(out[i], lanes, _mm512_mul_ps(acc[i], _mm512_set1_ps(scale)));
#else
  for (int i = 0; i < Q; ++i)
    for (int64_t e = 0; e < n; ++e) {
      float acc = 0.f;
      for (int64_t d = 0; d < dim; ++d) acc = std::fma(queries[i][d], static_cast<float>(keys[d * block_size + e]), acc);
      out[i][e] = acc * scale;
    }
#endif
}

// The same for any number of queries, 8 at a time (each key vector is loaded once per 8).
template <typename T>
inline void run_scores_any(const float* const* queries, int64_t nq, const T* keys, int64_t block_size, int64_t dim,
                           int64_t n, float scale, float* const* out) {
  for (int64_t i = 0; i < nq; i += 8)
    with_count<8>(std::min<int64_t>(8, nq - i),
                  [&](auto q) { run_scores<decltype(q)::value, T>(queries + i, keys, block_size, dim, n, scale, out + i); });
}

#if defined(__AVX512F__)
// The n <= 16 scores at s in the first lanes, -inf in the others.
inline __m512 load_scores(const float* s, int64_t n) {
  return _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), static_cast<__mmask16>((1u << n) - 1), s);
}
#endif

// The largest of the first `length` scores of each of nq rows.
void row_maxima(const float* s, int64_t s_stride, int64_t nq, int64_t length, float* top) {
  for (int64_t q = 0; q < nq; ++q, s += s_stride) {
#if defined(__AVX512F__)
    __m512 most = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t e = 0; e < length; e += 16) most = _mm512_max_ps(most, load_scores(s + e, std::min<int64_t>(16, length - e)));
    top[q] = _mm512_reduce_max_ps(most);
#else
    top[q] = *std::max_element(s, s + length);
#endif
  }
}

// out[q][0..dim) = softmax-weighted sum over the first `length` entries: w = exp(s[q][i] - top[q])
// times value(i), summed entry after entry and divided by the sum of w (also entry after entry),
// for Q <= queries_per_pass(V) queries at once (dim = 16 V), their sums in registers: each value
// vector is loaded once for all of them. A query's sums do not depend on the others in the pass.
#if defined(__AVX512F__)
template <int V, int Q, typename T>
void weighted_sums(const float* s, int64_t s_stride, const float* top, const T* values, const int64_t* blocks,
                   int64_t length, int64_t block_size, float* const* out) {
  __m512 sum[Q][V];
  float total[Q] = {};
  alignas(64) float w[Q][16];
  for (int q = 0; q < Q; ++q)
    for (int v = 0; v < V; ++v) sum[q][v] = _mm512_setzero_ps();
  for_each_run(values, blocks, block_size, 16 * V, 16 * V, 0, length, [&](int64_t first, int64_t n, const T* rows) {
    for (int q = 0; q < Q; ++q)
      _mm512_store_ps(w[q], exp_lanes(_mm512_sub_ps(load_scores(s + q * s_stride + first, n), _mm512_set1_ps(top[q]))));
    for (int64_t e = 0; e < n; ++e) {
      __m512 value[V];
      for (int v = 0; v < V; ++v) value[v] = load16(rows + e * 16 * V + 16 * v);
      for (int q = 0; q < Q; ++q) {
        total[q] += w[q][e];
        const __m512 weight = _mm512_set1_ps(w[q][e]);
        for (int v = 0; v < V; ++v) sum[q][v] = _mm512_fmadd_ps(weight, value[v], sum[q][v]);
      }
    }
  });
  for (int q = 0; q < Q; ++q)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(out[q] + v * 16, _mm512_div_ps(sum[q][v], _mm512_set1_ps(total[q])));
}

#endif

// The same for any dim, one query at a time, without vectors.
template <typename T>
void weighted_sums_scalar(const float* s, int64_t s_stride, const float* top, int64_t nq, const T* values, const int64_t* blocks,
                          int64_t length, int64_t block_size, int64_t dim, float* const* out) {
  for (int64_t q = 0; q < nq; ++q) {
    float total = 0.f;
    std::fill(out[q], out[q] + dim, 0.f);
    for_each_run(values, blocks, block_size, dim, dim, 0, length, [&](int64_t first, int64_t n, const T* rows) {
      for (int64_t e = 0; e < n; ++e) {
        const float w = std::exp(s[q * s_stride + first + e] - top[q]);
        total += w;
        for (int64_t d = 0; d < dim; ++d) out[q][d] += w * static_cast<float>(rows[e * dim + d]);
      }
    });
    for (int64_t d = 0; d < dim; ++d) out[q][d] /= total;
  }
}

template <typename T>
void weighted_sums_any(const float* s, int64_t s_stride, const float* top, int64_t nq, const T* values, const int64_t* blocks,
                       int64_t length, int64_t block_size, int64_t dim, float* const* out) {
#if defined(__AVX512F__)
  // the pass's query count chosen at compile time, so that its sums stay in registers
  if (with_vectors(dim, [&](auto v) {
        constexpr int V = decltype(v)::value;
        with_count<queries_per_pass(V)>(nq, [&](auto q) {
          weighted_sums<V, decltype(q)::value, T>(s, s_stride, top, values, blocks, length, block_size, out);
        });
      }))
    return;
#endif
  weighted_sums_scalar(s, s_stride, top, nq, values, blocks, length, block_size, dim, out);
}

struct Layout {
  int64_t batch, kv_heads, heads_per_slot, slots, dim, block_size, max_blocks;
  int64_t group() const { return slots * heads_per_slot; }  // query heads per (sequence, KV head)
};

// pool: values [blocks, block_size, dim], or keys [blocks, dim, block_size] (dim_major).
Layout check(int64_t heads, const torch::Tensor& pool, bool dim_major, const torch::Tensor& block_tables,
             const torch::Tensor& lengths, const torch::Tensor& row_of_slot) {
  TORCH_CHECK((pool.scalar_type() == torch::kFloat32 || pool.scalar_type() == torch::kFloat16) && pool.is_contiguous() && pool.dim() == 3,
              dim_major ? "the key pool must be float32 or float16 [blocks, dim, block_size]"
                        : "the value pool must be float32 or float16 [blocks, block_size, dim]");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && block_tables.is_contiguous() && block_tables.dim() == 3,
              "block_tables must be contiguous int64 [batch, kv_heads, blocks]");
  TORCH_CHECK(lengths.scalar_type() == torch::kInt64 && lengths.is_contiguous() && lengths.numel() == block_tables.size(0) * block_tables.size(1),
              "lengths must be contiguous int64 [batch, kv_heads]");
  TORCH_CHECK(row_of_slot.scalar_type() == torch::kInt64 && row_of_slot.is_contiguous() && row_of_slot.dim() == 2 &&
                  row_of_slot.size(0) == block_tables.size(0),
              "row_of_slot must be contiguous int64 [batch, slots]");
  const int64_t kv_heads = block_tables.size(1);
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of KV heads");
  const int64_t dim = pool.size(dim_major ? 1 : 2), block_size = pool.size(dim_major ? 2 : 1);
  return {block_tables.size(0), kv_heads, heads / kv_heads, row_of_slot.size(1), dim, block_size, block_tables.size(2)};
}

// Real slots of each sequence (the rest pad): block_rows, or one each when no sequence verifies a draft.
const int64_t* real_slots(const Layout& L, const torch::Tensor& block_rows) {
  if (block_rows.numel() == 0) {
    TORCH_CHECK(L.slots == 1, "block_rows is needed when a sequence has several slots");
    return nullptr;
  }
  TORCH_CHECK(block_rows.scalar_type() == torch::kInt64 && block_rows.is_contiguous() && block_rows.numel() == L.batch,
              "block_rows must be int64 [batch]");
  return block_rows.data_ptr<int64_t>();
}

}  // namespace

torch::Tensor paged_scores(torch::Tensor q, torch::Tensor key_pool, torch::Tensor block_tables, torch::Tensor lengths,
                           double scale, torch::Tensor row_of_slot, torch::Tensor block_visibility, torch::Tensor block_rows) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.stride(2) == 1, "q must be float32 [rows, heads, dim] with unit stride in dim");
  const Layout L = check(q.size(1), key_pool, true, block_tables, lengths, row_of_slot);
  TORCH_CHECK(q.size(2) == L.dim, "q and the key pool differ in head dim");
  const bool has_blocks = block_visibility.numel() > 0;
  const int64_t* rows = has_blocks ? real_slots(L, block_rows) : nullptr;
  if (has_blocks) {
    TORCH_CHECK(block_visibility.scalar_type() == torch::kBool && block_visibility.is_contiguous() &&
                    block_visibility.dim() == 3 && block_visibility.size(0) == L.batch &&
                    block_visibility.size(1) == L.slots && block_visibility.size(2) == L.slots,
                "block_visibility must be a contiguous bool [batch, slots, slots] tensor");
  } else {
    TORCH_CHECK(L.slots == 1, "block_visibility is needed when a sequence has several slots");
  }
  const bool* visibility = has_blocks ? block_visibility.data_ptr<bool>() : nullptr;
  const int64_t max_entries = L.max_blocks * L.block_size, group = L.group();
  auto scores = torch::empty({L.batch, L.kv_heads, group, max_entries}, q.options());
  const float* qp = q.data_ptr<float>();
  const int64_t row_stride = q.stride(0), head_stride = q.stride(1);
  const int64_t* row_of = row_of_slot.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = lengths.data_ptr<int64_t>();
  float* sp = scores.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  // work units: (sequence, KV head, run of entries), so that one long sequence still uses every thread
  constexpr int64_t kEntriesPerUnit = 256;
  const int64_t runs = (max_entries + kEntriesPerUnit - 1) / kEntriesPerUnit;
  auto score = [&](const auto* kp) {  // float or c10::Half: the pool's element type
    at::parallel_for(0, L.batch * L.kv_heads * runs, 1, [&](int64_t begin, int64_t end) {
      std::vector<const float*> queries(group);
      std::vector<float*> outs(group);
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t item = unit / runs, first = (unit % runs) * kEntriesPerUnit;
        const int64_t last = std::min(first + kEntriesPerUnit, max_entries);
        const int64_t length = lens[item], seq = item / L.kv_heads, kv_head = item % L.kv_heads;
        const int64_t block_start = has_blocks ? length - rows[seq] : length;
        const int64_t* blocks = tables + item * L.max_blocks;
        float* out = sp + item * group * max_entries;
        const int64_t stored_end = std::min(last, length);
        for (int64_t i = stored_end; i < last; ++i)
          for (int64_t g = 0; g < group; ++g) out[g * max_entries + i] = -std::numeric_limits<float>::infinity();
        for (int64_t g = 0; g < group; ++g)
          queries[g] = qp + row_of[seq * L.slots + g / L.heads_per_slot] * row_stride +
                       (kv_head * L.heads_per_slot + g % L.heads_per_slot) * head_stride;
        for_each_run(kp, blocks, L.block_size, L.dim, 1, first, stored_end, [&](int64_t run_first, int64_t n, const auto* keys) {
          for (int64_t g = 0; g < group; ++g) outs[g] = out + g * max_entries + run_first;
          run_scores_any(queries.data(), group, keys, L.block_size, L.dim, n, fscale, outs.data());
          for (int64_t g = 0; g < group && run_first + n > block_start; ++g) {  // hide the draft block's unseen entries
            const bool* sees = visibility + (seq * L.slots + g / L.heads_per_slot) * L.slots;
            for (int64_t i = std::max(run_first, block_start); i < run_first + n; ++i)
              if (!sees[i - block_start]) outs[g][i - run_first] = -std::numeric_limits<float>::infinity();
          }
        });
      }
    });
  };
  if (key_pool.scalar_type() == torch::kFloat16)
    score(key_pool.data_ptr<c10::Half>());
  else
    score(key_pool.data_ptr<float>());
  return scores;
}

torch::Tensor paged_softmax_values(torch::Tensor scores, torch::Tensor value_pool, torch::Tensor block_tables,
                                   torch::Tensor lengths, torch::Tensor row_of_slot, torch::Tensor block_rows, int64_t num_rows) {
  TORCH_CHECK(scores.dim() == 4 && scores.scalar_type() == torch::kFloat32 && scores.is_contiguous(),
              "scores must be a contiguous float32 [batch, kv_heads, slots * heads per slot, entries] tensor");
  const Layout L = check(scores.size(2) / row_of_slot.size(1) * block_tables.size(1), value_pool, false, block_tables,
                         lengths, row_of_slot);
  const int64_t group = L.group(), max_entries = scores.size(3);
  TORCH_CHECK(scores.size(0) == L.batch && scores.size(1) == L.kv_heads && scores.size(2) == group, "scores do not match the block tables");
  const int64_t* rows = real_slots(L, block_rows);
  auto out = torch::empty({num_rows, L.kv_heads * L.heads_per_slot, L.dim}, scores.options());
  const float* sp = scores.data_ptr<float>();
  const int64_t* row_of = row_of_slot.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = lengths.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  // work units: (sequence, KV head, a pass's queries of the group), at least four per thread when there are
  const int64_t items = L.batch * L.kv_heads, threads = at::get_num_threads();
  int64_t most_per_pass = 1;
  with_vectors(L.dim, [&](auto v) { most_per_pass = queries_per_pass(decltype(v)::value); });
  const int64_t per_pass = std::clamp<int64_t>(items * group / (4 * threads), 1, most_per_pass);
  const int64_t passes = (group + per_pass - 1) / per_pass;
  auto sum_values = [&](const auto* vp) {  // float or c10::Half: the pool's element type
    at::parallel_for(0, items * passes, 1, [&](int64_t begin, int64_t end) {
      float* outs[queries_per_pass(1)];
      float top[queries_per_pass(1)];
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t item = unit / passes, query = (unit % passes) * per_pass;
        const int64_t seq = item / L.kv_heads, kv_head = item % L.kv_heads;
        const int64_t real = (rows ? rows[seq] : 1) * L.heads_per_slot;  // padding slots' queries are not summed
        const int64_t nq = std::min(per_pass, real - query);
        for (int64_t q = 0; q < nq; ++q) {
          const int64_t g = query + q, row = row_of[seq * L.slots + g / L.heads_per_slot];
          outs[q] = op + (row * L.kv_heads * L.heads_per_slot + kv_head * L.heads_per_slot + g % L.heads_per_slot) * L.dim;
        }
        if (nq <= 0) continue;
        const float* scores_of = sp + (item * group + query) * max_entries;
        row_maxima(scores_of, max_entries, nq, lens[item], top);
        weighted_sums_any(scores_of, max_entries, top, nq, vp, tables + item * L.max_blocks, lens[item], L.block_size, L.dim, outs);
      }
    });
  };
  if (value_pool.scalar_type() == torch::kFloat16)
    sum_values(value_pool.data_ptr<c10::Half>());
  else
    sum_values(value_pool.data_ptr<float>());
  return out;
}
