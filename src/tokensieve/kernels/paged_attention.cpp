// Decode attention that reads keys and values where they lie in the block pool (float32, or float16
// converted to float32 as they are loaded: half the bytes read at long context), or in a quantized pool
// (int8 or int4 codes, each vector of 16 dequantized as it is loaded; the blocks being filled are read
// from their float32 staging blocks).
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

// A run of entries of one block of a float pool: keys dimension-major (row(d): dim d of the run's
// entries, `block_size` elements apart), values entry-major (load_entry(e): entry e's vectors).
template <typename T>
struct PoolKeys {
  const T* p;
  int64_t block_size;
  float at(int64_t d, int64_t e) const { return static_cast<float>(p[d * block_size + e]); }
#if defined(__AVX512F__)
  __m512 row(int64_t d, __mmask16 lanes) const { return load_lanes(p + d * block_size, lanes); }
#endif
};

template <typename T>
struct PoolValues {
  const T* p;
  int64_t dim;
  float at(int64_t e, int64_t d) const { return static_cast<float>(p[e * dim + d]); }
#if defined(__AVX512F__)
  template <int V>
  void load_entry(int64_t e, __m512* value) const {  // the V vectors of entry e (dim = 16 V)
    for (int v = 0; v < V; ++v) value[v] = load16(p + e * dim + 16 * v);
  }
#endif
};

// f(first, n, run) for runs of n <= 16 entries of one (sequence, KV head) from `first` to `end` that
// lie in one block, run reading them in the pool: PoolKeys (dim_major) or PoolValues.
template <bool dim_major, typename T, typename F>
inline void for_each_run(const T* pool, const int64_t* blocks, int64_t block_size, int64_t dim, int64_t first, int64_t end,
                         F&& f) {
  constexpr int64_t kMaxRun = 16;
  for (int64_t i = first; i < end;) {
    const int64_t in_block = i % block_size, n = std::min({end - i, block_size - in_block, kMaxRun});
    const T* entry = pool + blocks[i / block_size] * block_size * dim + in_block * (dim_major ? 1 : dim);
    if constexpr (dim_major)
      f(i, n, PoolKeys<T>{entry, block_size});
    else
      f(i, n, PoolValues<T>{entry, dim});
    i += n;
  }
}

// A quantized pool's blocks (quantized_kv_pool.py), always 16 entries: `bits`-bit codes, each run of 16
// codes sharing a float16 scale and zero (keys: a dimension over a block's entries; values: 16 dims of
// an entry's group of `group` dims), and a float32 staging block for each block being filled.
struct QuantizedBlocks {
  const uint8_t* codes;
  const c10::Half* scale;
  const c10::Half* zero;
  const int64_t* staging_of;  // a block's staging block, or -1 when its codes hold it
  const float* staging;
  int64_t bits, dim, group;
  int64_t bytes(int64_t codes_count) const { return codes_count * bits / 8; }
};
constexpr int64_t kQuantizedBlock = 16;

inline float widen(c10::Half h) {
#if defined(__F16C__)
  return _cvtsh_ss(h.x);
#else
  return static_cast<float>(h);
#endif
}

// Code i of a row of codes (int4: two to a byte, the even one in the low nibble).
inline int code_at(const uint8_t* row, int64_t bits, int64_t i) { return bits == 8 ? row[i] : (row[i / 2] >> (4 * (i % 2))) & 15; }

#if defined(__AVX512F__)
// code * scale + zero for the 16 codes at `row`.
inline __m512 decode16(const uint8_t* row, int64_t bits, float scale, float zero) {
  __m128i bytes;
  if (bits == 8) {
    bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
  } else {
    const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row)), nibble = _mm_set1_epi8(15);
    bytes = _mm_unpacklo_epi8(_mm_and_si128(packed, nibble), _mm_and_si128(_mm_srli_epi16(packed, 4), nibble));
  }
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)), _mm512_set1_ps(scale), _mm512_set1_ps(zero));
}
#endif

// A quantized block's keys, from its entry 0 (row(d): dim d of its 16 entries).
struct QuantizedKeys {
  const uint8_t* codes;
  const c10::Half* scale;
  const c10::Half* zero;
  int64_t bits;
  float at(int64_t d, int64_t e) const { return code_at(codes + d * 2 * bits, bits, e) * widen(scale[d]) + widen(zero[d]); }
#if defined(__AVX512F__)
  __m512 row(int64_t d, __mmask16) const { return decode16(codes + d * 2 * bits, bits, widen(scale[d]), widen(zero[d])); }
#endif
};

// A quantized block's values, from entry `first` (load_entry: the V vectors of entry first + e).
struct QuantizedValues {
  const uint8_t* codes;
  const c10::Half* scale;
  const c10::Half* zero;
  int64_t bits, dim, group;
  float at(int64_t e, int64_t d) const {
    const int64_t g = e * (dim / group) + d / group;
    return code_at(codes + e * dim * bits / 8, bits, d) * widen(scale[g]) + widen(zero[g]);
  }
#if defined(__AVX512F__)
  template <int V>
  void load_entry(int64_t e, __m512* value) const {  // each group's scale and zero widened once for its vectors
    const uint8_t* row = codes + e * V * 2 * bits;
    const int64_t groups = dim / group;
    const c10::Half* s = scale + e * groups;
    const c10::Half* z = zero + e * groups;
    if (group == 32) {  // the pool's groups: two vectors each (the loop unrolled, the vectors in registers)
      for (int v = 0; v < V; ++v) {
        const float sv = widen(s[v / 2]), zv = widen(z[v / 2]);
        value[v] = decode16(row + v * 2 * bits, bits, sv, zv);
        if (++v < V) value[v] = decode16(row + v * 2 * bits, bits, sv, zv);
      }
    } else {
      for (int v = 0; v < V; ++v) value[v] = decode16(row + v * 2 * bits, bits, widen(s[16 * v / group]), widen(z[16 * v / group]));
    }
  }
#endif
};

// for_each_run over a quantized pool: a block being filled is read in staging (PoolKeys / PoolValues of
// float), the others as QuantizedKeys / QuantizedValues (keys' runs must start at a block's first entry).
template <bool dim_major, typename F>
inline void for_each_quantized_run(const QuantizedBlocks& p, const int64_t* blocks, int64_t first, int64_t end, F&& f) {
  for (int64_t i = first; i < end;) {
    const int64_t in_block = i % kQuantizedBlock, n = std::min(end - i, kQuantizedBlock - in_block);
    const int64_t block = blocks[i / kQuantizedBlock], staged = p.staging_of[block];
    if (staged >= 0) {
      for_each_run<dim_major>(p.staging, &staged, kQuantizedBlock, p.dim, in_block, in_block + n,
                              [&](int64_t, int64_t, auto run) { f(i, n, run); });
    } else if constexpr (dim_major) {
      TORCH_CHECK(in_block == 0, "a run of quantized keys starts at a block's first entry");
      f(i, n, QuantizedKeys{p.codes + block * p.dim * p.bytes(kQuantizedBlock), p.scale + block * p.dim, p.zero + block * p.dim, p.bits});
    } else {
      const int64_t entry = block * kQuantizedBlock + in_block, groups = p.dim / p.group;
      f(i, n, QuantizedValues{p.codes + entry * p.bytes(p.dim), p.scale + entry * groups, p.zero + entry * groups, p.bits, p.dim, p.group});
    }
    i += n;
  }
}

// out[i][0..n) = (query i . key e) * scale for the n <= 16 entries of a run of dimension-major keys,
// for Q queries: one chain of multiply-adds over d = 0, 1, ... per score, so a score does not depend on
// the other queries or entries.
template <int Q, typename Keys>
inline void run_scores(const float* const* queries, const Keys& keys, int64_t dim, int64_t n, float scale, float* const* out) {
#if defined(__AVX512F__)
  const __mmask16 lanes = static_cast<__mmask16>((1u << n) - 1);
  __m512 acc[Q];
  for (int i = 0; i < Q; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; ++d) {
    const __m512 key = keys.row(d, lanes);
    for (int i = 0; i < Q; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(queries[i][d]), key, acc[i]);
  }
  for (int i = 0; i < Q; ++i) _mm512_mask_storeu_ps(out[i], lanes, _mm512_mul_ps(acc[i], _mm512_set1_ps(scale)));
#else
  for (int i = 0; i < Q; ++i)
    for (int64_t e = 0; e < n; ++e) {
      float acc = 0.f;
      for (int64_t d = 0; d < dim; ++d) acc = std::fma(queries[i][d], keys.at(d, e), acc);
      out[i][e] = acc * scale;
    }
#endif
}

// The same for any number of queries, 8 at a time (each key vector is loaded once per 8).
template <typename Keys>
inline void run_scores_any(const float* const* queries, int64_t nq, const Keys& keys, int64_t dim, int64_t n, float scale,
                           float* const* out) {
  for (int64_t i = 0; i < nq; i += 8)
    with_count<8>(std::min<int64_t>(8, nq - i), [&](auto q) { run_scores<decltype(q)::value>(queries + i, keys, dim, n, scale, out + i); });
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
template <int V, int Q, typename Runs>
void weighted_sums(const float* s, int64_t s_stride, const float* top, Runs&& runs, int64_t length, float* const* out) {
  __m512 sum[Q][V];
  float total[Q] = {};
  alignas(64) float w[Q][16];
  for (int q = 0; q < Q; ++q)
    for (int v = 0; v < V; ++v) sum[q][v] = _mm512_setzero_ps();
  runs(length, [&](int64_t first, int64_t n, const auto& rows) {
    for (int q = 0; q < Q; ++q)
      _mm512_store_ps(w[q], exp_lanes(_mm512_sub_ps(load_scores(s + q * s_stride + first, n), _mm512_set1_ps(top[q]))));
    for (int64_t e = 0; e < n; ++e) {
      __m512 value[V];
      rows.template load_entry<V>(e, value);
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
template <typename Runs>
void weighted_sums_scalar(const float* s, int64_t s_stride, const float* top, int64_t nq, Runs&& runs, int64_t length,
                          int64_t dim, float* const* out) {
  for (int64_t q = 0; q < nq; ++q) {
    float total = 0.f;
    std::fill(out[q], out[q] + dim, 0.f);
    runs(length, [&](int64_t first, int64_t n, const auto& rows) {
      for (int64_t e = 0; e < n; ++e) {
        const float w = std::exp(s[q * s_stride + first + e] - top[q]);
        total += w;
        for (int64_t d = 0; d < dim; ++d) out[q][d] += w * rows.at(e, d);
      }
    });
    for (int64_t d = 0; d < dim; ++d) out[q][d] /= total;
  }
}

// runs(length, f) calls f(first, n, rows) for runs of the entries' values, as for_each_run does.
template <typename Runs>
void weighted_sums_any(const float* s, int64_t s_stride, const float* top, int64_t nq, Runs&& runs, int64_t length,
                       int64_t dim, float* const* out) {
#if defined(__AVX512F__)
  // the pass's query count chosen at compile time, so that its sums stay in registers
  if (with_vectors(dim, [&](auto v) {
        constexpr int V = decltype(v)::value;
        with_count<queries_per_pass(V)>(nq, [&](auto q) { weighted_sums<V, decltype(q)::value>(s, s_stride, top, runs, length, out); });
      }))
    return;
#endif
  weighted_sums_scalar(s, s_stride, top, nq, runs, length, dim, out);
}

struct Layout {
  int64_t batch, kv_heads, heads_per_slot, slots, dim, block_size, max_blocks;
  int64_t group() const { return slots * heads_per_slot; }  // query heads per (sequence, KV head)
};

Layout check(int64_t heads, int64_t dim, int64_t block_size, const torch::Tensor& block_tables, const torch::Tensor& lengths,
             const torch::Tensor& row_of_slot) {
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && block_tables.is_contiguous() && block_tables.dim() == 3,
              "block_tables must be contiguous int64 [batch, kv_heads, blocks]");
  TORCH_CHECK(lengths.scalar_type() == torch::kInt64 && lengths.is_contiguous() && lengths.numel() == block_tables.size(0) * block_tables.size(1),
              "lengths must be contiguous int64 [batch, kv_heads]");
  TORCH_CHECK(row_of_slot.scalar_type() == torch::kInt64 && row_of_slot.is_contiguous() && row_of_slot.dim() == 2 &&
                  row_of_slot.size(0) == block_tables.size(0),
              "row_of_slot must be contiguous int64 [batch, slots]");
  const int64_t kv_heads = block_tables.size(1);
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of KV heads");
  return {block_tables.size(0), kv_heads, heads / kv_heads, row_of_slot.size(1), dim, block_size, block_tables.size(2)};
}

// A float pool: values [blocks, block_size, dim], or keys [blocks, dim, block_size] (dim_major).
Layout check_pool(int64_t heads, const torch::Tensor& pool, bool dim_major, const torch::Tensor& block_tables,
                  const torch::Tensor& lengths, const torch::Tensor& row_of_slot) {
  TORCH_CHECK((pool.scalar_type() == torch::kFloat32 || pool.scalar_type() == torch::kFloat16) && pool.is_contiguous() && pool.dim() == 3,
              dim_major ? "the key pool must be float32 or float16 [blocks, dim, block_size]"
                        : "the value pool must be float32 or float16 [blocks, block_size, dim]");
  return check(heads, pool.size(dim_major ? 1 : 2), pool.size(dim_major ? 2 : 1), block_tables, lengths, row_of_slot);
}

// A quantized pool's keys (codes [blocks, dim, 16 * bits / 8], scale and zero [blocks, dim, 1]) or values
// (codes [blocks, 16, dim * bits / 8], scale and zero [blocks, 16, groups]), and staging of the float layout.
QuantizedBlocks quantized_blocks(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& zero,
                                 const torch::Tensor& staging_of, const torch::Tensor& staging, int64_t bits, bool keys) {
  TORCH_CHECK(bits == 8 || bits == 4, "quantized KV blocks have 8 or 4 bits, got ", bits);
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.dim() == 3, "codes must be contiguous uint8 [blocks, ., .]");
  const int64_t dim = keys ? codes.size(1) : codes.size(2) * 8 / bits;
  TORCH_CHECK((keys ? codes.size(2) * 8 / bits : codes.size(1)) == kQuantizedBlock && dim % 16 == 0,
              "quantized blocks hold 16 entries of a head dim that is a multiple of 16");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat16 && zero.scalar_type() == torch::kFloat16 && scale.is_contiguous() &&
                  zero.is_contiguous() && scale.sizes() == zero.sizes() && scale.size(0) == codes.size(0) && scale.size(1) == codes.size(1),
              "scale and zero must be contiguous float16 [blocks, ., groups]");
  const int64_t groups = scale.size(2), group = dim / groups;
  TORCH_CHECK(keys ? groups == 1 : dim % groups == 0 && group % 16 == 0,
              "keys have one scale per dimension, values one per group of a multiple of 16 dims");
  TORCH_CHECK(staging_of.scalar_type() == torch::kInt64 && staging_of.is_contiguous() && staging_of.numel() == codes.size(0),
              "staging_of must be contiguous int64 [blocks]");
  TORCH_CHECK(staging.scalar_type() == torch::kFloat32 && staging.is_contiguous() && staging.dim() == 3 &&
                  staging.size(0) * staging.size(1) * staging.size(2) % (kQuantizedBlock * dim) == 0,
              "staging must be contiguous float32 blocks of 16 entries");
  return {codes.data_ptr<uint8_t>(), scale.data_ptr<c10::Half>(), zero.data_ptr<c10::Half>(), staging_of.data_ptr<int64_t>(),
          staging.data_ptr<float>(), bits, dim, group};
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

// The scores of paged_scores, the keys read by runs(blocks, first, end, f), which calls f(first, n, keys)
// for runs of entries within one block (keys: PoolKeys or QuantizedKeys).
template <typename Runs>
torch::Tensor scores_over(const Layout& L, const torch::Tensor& q, const torch::Tensor& block_tables, const torch::Tensor& lengths,
                          double scale, const torch::Tensor& row_of_slot, const torch::Tensor& block_visibility,
                          const torch::Tensor& block_rows, Runs&& runs) {
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
  const int64_t runs_per_item = (max_entries + kEntriesPerUnit - 1) / kEntriesPerUnit;
  at::parallel_for(0, L.batch * L.kv_heads * runs_per_item, 1, [&](int64_t begin, int64_t end) {
    std::vector<const float*> queries(group);
    std::vector<float*> outs(group);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t item = unit / runs_per_item, first = (unit % runs_per_item) * kEntriesPerUnit;
      const int64_t last = std::min(first + kEntriesPerUnit, max_entries);
      const int64_t length = lens[item], seq = item / L.kv_heads, kv_head = item % L.kv_heads;
      const int64_t block_start = has_blocks ? length - rows[seq] : length;
      float* out = sp + item * group * max_entries;
      const int64_t stored_end = std::min(last, length);
      for (int64_t i = stored_end; i < last; ++i)
        for (int64_t g = 0; g < group; ++g) out[g * max_entries + i] = -std::numeric_limits<float>::infinity();
      for (int64_t g = 0; g < group; ++g)
        queries[g] = qp + row_of[seq * L.slots + g / L.heads_per_slot] * row_stride +
                     (kv_head * L.heads_per_slot + g % L.heads_per_slot) * head_stride;
      runs(tables + item * L.max_blocks, first, stored_end, [&](int64_t run_first, int64_t n, const auto& keys) {
        for (int64_t g = 0; g < group; ++g) outs[g] = out + g * max_entries + run_first;
        run_scores_any(queries.data(), group, keys, L.dim, n, fscale, outs.data());
        for (int64_t g = 0; g < group && run_first + n > block_start; ++g) {  // hide the draft block's unseen entries
          const bool* sees = visibility + (seq * L.slots + g / L.heads_per_slot) * L.slots;
          for (int64_t i = std::max(run_first, block_start); i < run_first + n; ++i)
            if (!sees[i - block_start]) outs[g][i - run_first] = -std::numeric_limits<float>::infinity();
        }
      });
    }
  });
  return scores;
}

// The output of paged_softmax_values, the values read by runs(blocks, length, f), which calls f(first, n,
// rows) for runs of entries within one block (rows: PoolValues or QuantizedValues).
template <typename Runs>
torch::Tensor softmax_values_over(const Layout& L, const torch::Tensor& scores, const torch::Tensor& block_tables,
                                  const torch::Tensor& lengths, const torch::Tensor& row_of_slot, const torch::Tensor& block_rows,
                                  int64_t num_rows, Runs&& runs) {
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
      const int64_t* blocks = tables + item * L.max_blocks;
      row_maxima(scores_of, max_entries, nq, lens[item], top);
      weighted_sums_any(scores_of, max_entries, top, nq, [&](int64_t length, auto&& f) { runs(blocks, length, f); },
                        lens[item], L.dim, outs);
    }
  });
  return out;
}

void check_scores(const torch::Tensor& scores) {
  TORCH_CHECK(scores.dim() == 4 && scores.scalar_type() == torch::kFloat32 && scores.is_contiguous(),
              "scores must be a contiguous float32 [batch, kv_heads, slots * heads per slot, entries] tensor");
}

void check_queries(const torch::Tensor& q) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.stride(2) == 1, "q must be float32 [rows, heads, dim] with unit stride in dim");
}

}  // namespace

torch::Tensor paged_scores(torch::Tensor q, torch::Tensor key_pool, torch::Tensor block_tables, torch::Tensor lengths,
                           double scale, torch::Tensor row_of_slot, torch::Tensor block_visibility, torch::Tensor block_rows) {
  check_queries(q);
  const Layout L = check_pool(q.size(1), key_pool, true, block_tables, lengths, row_of_slot);
  auto score = [&](const auto* kp) {  // float or c10::Half: the pool's element type
    return scores_over(L, q, block_tables, lengths, scale, row_of_slot, block_visibility, block_rows,
                       [&](const int64_t* blocks, int64_t first, int64_t end, auto&& f) {
                         for_each_run<true>(kp, blocks, L.block_size, L.dim, first, end, f);
                       });
  };
  if (key_pool.scalar_type() == torch::kFloat16) return score(key_pool.data_ptr<c10::Half>());
  return score(key_pool.data_ptr<float>());
}

torch::Tensor paged_softmax_values(torch::Tensor scores, torch::Tensor value_pool, torch::Tensor block_tables,
                                   torch::Tensor lengths, torch::Tensor row_of_slot, torch::Tensor block_rows, int64_t num_rows) {
  check_scores(scores);
  const Layout L = check_pool(scores.size(2) / row_of_slot.size(1) * block_tables.size(1), value_pool, false, block_tables,
                              lengths, row_of_slot);
  auto sum_values = [&](const auto* vp) {  // float or c10::Half: the pool's element type
    return softmax_values_over(L, scores, block_tables, lengths, row_of_slot, block_rows, num_rows,
                               [&](const int64_t* blocks, int64_t length, auto&& f) {
                                 for_each_run<false>(vp, blocks, L.block_size, L.dim, 0, length, f);
                               });
  };
  if (value_pool.scalar_type() == torch::kFloat16) return sum_values(value_pool.data_ptr<c10::Half>());
  return sum_values(value_pool.data_ptr<float>());
}

torch::Tensor paged_scores_quantized(torch::Tensor q, torch::Tensor key_codes, torch::Tensor key_scale, torch::Tensor key_zero,
                                     torch::Tensor staging_of, torch::Tensor staging_keys, int64_t bits, torch::Tensor block_tables,
                                     torch::Tensor lengths, double scale, torch::Tensor row_of_slot, torch::Tensor block_visibility,
                                     torch::Tensor block_rows) {
  check_queries(q);
  const QuantizedBlocks keys = quantized_blocks(key_codes, key_scale, key_zero, staging_of, staging_keys, bits, true);
  const Layout L = check(q.size(1), keys.dim, kQuantizedBlock, block_tables, lengths, row_of_slot);
  return scores_over(L, q, block_tables, lengths, scale, row_of_slot, block_visibility, block_rows,
                     [&](const int64_t* blocks, int64_t first, int64_t end, auto&& f) {
                       for_each_quantized_run<true>(keys, blocks, first, end, f);
                     });
}

torch::Tensor paged_softmax_values_quantized(torch::Tensor scores, torch::Tensor value_codes, torch::Tensor value_scale,
                                             torch::Tensor value_zero, torch::Tensor staging_of, torch::Tensor staging_values,
                                             int64_t bits, torch::Tensor block_tables, torch::Tensor lengths,
                                             torch::Tensor row_of_slot, torch::Tensor block_rows, int64_t num_rows) {
  check_scores(scores);
  const QuantizedBlocks values = quantized_blocks(value_codes, value_scale, value_zero, staging_of, staging_values, bits, false);
  const Layout L = check(scores.size(2) / row_of_slot.size(1) * block_tables.size(1), values.dim, kQuantizedBlock, block_tables,
                         lengths, row_of_slot);
  return softmax_values_over(L, scores, block_tables, lengths, row_of_slot, block_rows, num_rows,
                             [&](const int64_t* blocks, int64_t length, auto&& f) {
                               for_each_quantized_run<false>(values, blocks, 0, length, f);
                             });
}
