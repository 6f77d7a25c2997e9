// y = x @ W^T with the activations x quantized to int8 (per row and 32-entry block, as llama.cpp's
// Q8_0 activations) and W in GGUF's Q4_0 / Q4_1 / Q8_0 blocks, repacked 16 outputs to a vector
// (models/int8_weight.py): vector j of a block holds, in lane c, output c's weights 4j .. 4j+3, so
// one VNNI instruction adds 4 products to each of 16 outputs. A block's dot product is exact in
// int32; each (row, output) then adds dot * (weight scale * activation scale), block after block
// (the weight scales and Q4_1 mins kept in float16, as GGUF stores them),
// the same float operations whatever the number of rows: results do not depend on the batch.
// AVX-512 VNNI where the CPU has it, else plain C++ doing exactly the same arithmetic.
#include "kernels.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using namespace gguf;

constexpr int kLanes = 16;     // outputs per group
constexpr int kMostRows = 12;  // rows per pass over a group's weights

// Bytes of one block of one group: 16 outputs x 32 weights, as bytes (Q8_0, offset by 128 to be
// unsigned) or as nibbles (Q4_0, Q4_1: the low nibbles are weights 0..15, the high ones 16..31).
constexpr int64_t group_block_bytes(int kind) { return kind == Q8_0 ? kLanes * kBlock : kLanes * kBlock / 2; }

// What the unsigned stored weight u means: Q4_0 is u - 8, Q8_0 is u - 128, Q4_1 is d * u + m.
constexpr int32_t zero_point(int kind) { return kind == Q4_0 ? 8 : kind == Q8_0 ? 128 : 0; }

// The rows in int8: per block a scale d (x ~ d * q) and, from the block's sum of q, the term the
// weights' zero point (Q4_0, Q8_0: an int) or min (Q4_1: d * sum, a float) adds.
struct Int8Rows {
  int64_t num_blocks;
  std::vector<int8_t> values;       // [M][K]
  std::vector<float> scales;        // [M][num_blocks]
  std::vector<int32_t> zero_terms;  // [M][num_blocks]: zero point * sum(q)
  std::vector<float> min_terms;     // [M][num_blocks]: d * sum(q)
};

// Nearest int8 of every x / d, with d = max|x| / 127 over its block (d = 0 for a block of zeros).
void quantize_block(const float* x, int8_t* q, float& d, int32_t& sum) {
  float amax = 0.f;
  for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(x[j]));
  d = amax / 127.f;
  const float inverse = d != 0.f ? 1.f / d : 0.f;
  sum = 0;
  for (int j = 0; j < kBlock; ++j) {
    q[j] = static_cast<int8_t>(std::nearbyint(x[j] * inverse));
    sum += q[j];
  }
}

Int8Rows quantize_rows(const float* x, int64_t M, int64_t K, int kind) {
  Int8Rows rows{K / kBlock, std::vector<int8_t>(M * K), std::vector<float>(M * (K / kBlock)),
                std::vector<int32_t>(M * (K / kBlock)), std::vector<float>(M * (K / kBlock))};
  at::parallel_for(0, M * rows.num_blocks, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int32_t sum;
      quantize_block(x + i * kBlock, rows.values.data() + i * kBlock, rows.scales[i], sum);
      rows.zero_terms[i] = zero_point(kind) * sum;
      rows.min_terms[i] = rows.scales[i] * static_cast<float>(sum);
    }
  });
  return rows;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

typedef int32_t __attribute__((may_alias)) AliasedInt32;
constexpr int64_t kPrefetchBlocks = 4;

// The 8 vectors of one block of a group, as unsigned bytes.
template <int KIND>
inline void load_weights(const uint8_t* w, __m512i* v) {
  if constexpr (KIND == Q8_0) {
    for (int j = 0; j < 8; ++j) v[j] = _mm512_loadu_si512(w + 64 * j);
  } else {
    const __m512i nibble = _mm512_set1_epi8(15);
    for (int j = 0; j < 4; ++j) {
      const __m512i bytes = _mm512_loadu_si512(w + 64 * j);
      v[j] = _mm512_and_si512(bytes, nibble);
      v[j + 4] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
    }
  }
}

// 16 float16 values (a block's scales or mins of the 16 outputs) as floats, exactly.
inline __m512 load_halves(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// R rows by the 16 outputs of one group, their accumulators in registers.
template <int KIND, int R>
inline void group_tile(const Int8Rows& x, int64_t row0, const uint8_t* w, const at::Half* dw,
                       const at::Half* mw, float* out, int64_t N, __mmask16 lanes) {
  const int64_t nb = x.num_blocks;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    // the weights stream from memory: fetch them some blocks ahead (past the group: the next one's)
    for (int64_t line = 0; line < group_block_bytes(KIND); line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w + (b + kPrefetchBlocks) * group_block_bytes(KIND) + line), _MM_HINT_T0);
    __m512i v[8];
    load_weights<KIND>(w + b * group_block_bytes(KIND), v);
    const __m512 weight_scales = load_halves(dw + b * kLanes);
    for (int r = 0; r < R; ++r) {
      const int64_t i = (row0 + r) * nb + b;
      const AliasedInt32* q = reinterpret_cast<const AliasedInt32*>(x.values.data() + i * kBlock);
      __m512i dot = _mm512_setzero_si512();
      __m512i odd = _mm512_setzero_si512();
      for (int j = 0; j < 8; j += 2) {
        dot = _mm512_dpbusd_epi32(dot, v[j], _mm512_set1_epi32(q[j]));
        odd = _mm512_dpbusd_epi32(odd, v[j + 1], _mm512_set1_epi32(q[j + 1]));
      }
      dot = _mm512_add_epi32(dot, odd);
      if constexpr (KIND != Q4_1) dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(x.zero_terms[i]));
      const __m512 scale = _mm512_mul_ps(weight_scales, _mm512_set1_ps(x.scales[i]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
      if constexpr (KIND == Q4_1)
        acc[r] = _mm512_fmadd_ps(load_halves(mw + b * kLanes), _mm512_set1_ps(x.min_terms[i]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + (row0 + r) * N, lanes, acc[r]);
}

// The tile of exactly `rows` rows (1..R), its size chosen at compile time.
template <int KIND, int R>
inline void tile_of(int64_t rows, const Int8Rows& x, int64_t row0, const uint8_t* w, const at::Half* dw,
                    const at::Half* mw, float* out, int64_t N, int valid) {
  if constexpr (R > 1)
    if (rows < R) return tile_of<KIND, R - 1>(rows, x, row0, w, dw, mw, out, N, valid);
  group_tile<KIND, R>(x, row0, w, dw, mw, out, N, static_cast<__mmask16>((1u << valid) - 1));
}

#else  // portable: the same integer dots and the same float operations, one output at a time

template <int KIND>
inline int32_t weight_at(const uint8_t* w, int c, int k) {
  const int j = k / 4, i = k % 4;
  if (KIND == Q8_0) return w[64 * j + 4 * c + i];
  const uint8_t byte = w[64 * (j % 4) + 4 * c + i];
  return j < 4 ? byte & 15 : byte >> 4;
}

template <int KIND, int R>
inline void tile_of(int64_t rows, const Int8Rows& x, int64_t row0, const uint8_t* w, const at::Half* dw,
                    const at::Half* mw, float* out, int64_t N, int valid) {
  const int64_t nb = x.num_blocks;
  for (int64_t r = row0; r < row0 + rows; ++r)
    for (int c = 0; c < valid; ++c) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t i = r * nb + b;
        const uint8_t* wb = w + b * group_block_bytes(KIND);
        int32_t dot = 0;
        for (int k = 0; k < kBlock; ++k) dot += weight_at<KIND>(wb, c, k) * x.values[i * kBlock + k];
        if (KIND != Q4_1) dot -= x.zero_terms[i];
        acc = std::fma(static_cast<float>(dot), static_cast<float>(dw[b * kLanes + c]) * x.scales[i], acc);
        if (KIND == Q4_1) acc = std::fma(static_cast<float>(mw[b * kLanes + c]), x.min_terms[i], acc);
      }
      out[r * N + c] = acc;
    }
}

#endif

// Every row by groups [g_begin, g_end): the rows in as few passes of equal size as the registers
// allow, each over the group's weights (which stay in L1 between passes).
template <int KIND>
void groups(const Int8Rows& x, int64_t M, const uint8_t* packed, const at::Half* scales, const at::Half* mins,
            float* out, int64_t N, int64_t g_begin, int64_t g_end) {
  const int64_t nb = x.num_blocks, passes = (M + kMostRows - 1) / kMostRows;
  for (int64_t g = g_begin; g < g_end; ++g) {
    const uint8_t* w = packed + g * nb * group_block_bytes(KIND);
    const at::Half* dw = scales + g * nb * kLanes;
    const at::Half* mw = KIND == Q4_1 ? mins + g * nb * kLanes : nullptr;
    const int valid = static_cast<int>(std::min<int64_t>(kLanes, N - g * kLanes));
    for (int64_t r = 0, pass = 0; pass < passes; ++pass) {
      const int64_t rows = (M - r) / (passes - pass);
      tile_of<KIND, kMostRows>(rows, x, r, w, dw, mw, out + g * kLanes, N, valid);
      r += rows;
    }
  }
}

}  // namespace

torch::Tensor int8_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, torch::Tensor mins,
                          int64_t kind, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be a 2-D float32 tensor");
  TORCH_CHECK(kind == Q4_0 || kind == Q4_1 || kind == Q8_0, "unknown block kind ", kind);
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = out_features, num_groups = packed.size(0);
  TORCH_CHECK(K % kBlock == 0, "K must be a multiple of 32");
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == K / kBlock && packed.size(2) == group_block_bytes(kind) &&
                  num_groups * kLanes >= N && packed.is_contiguous(),
              "packed weights do not match x (", K, " inputs) and kind ", kind);
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
  const Int8Rows rows = quantize_rows(x.data_ptr<float>(), M, K, static_cast<int>(kind));
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  TORCH_CHECK(scales.scalar_type() == torch::kFloat16 && (kind != Q4_1 || mins.scalar_type() == torch::kFloat16),
              "the blocks' scales and mins must be float16, as GGUF stores them");
  const at::Half* sp = scales.data_ptr<at::Half>();
  const at::Half* mp = kind == Q4_1 ? mins.data_ptr<at::Half>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, num_groups, 4, [&](int64_t begin, int64_t end) {
    if (kind == Q4_0) groups<Q4_0>(rows, M, pp, sp, mp, op, N, begin, end);
    else if (kind == Q4_1) groups<Q4_1>(rows, M, pp, sp, mp, op, N, begin, end);
    else groups<Q8_0>(rows, M, pp, sp, mp, op, N, begin, end);
  });
  return out;
}
