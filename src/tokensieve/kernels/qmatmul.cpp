// y = x @ W^T with W kept in GGUF's 32-weight blocks (Q4_0, Q4_1, Q8_0).
//
// Each block is dequantized to float32 exactly as the gguf package does it (d * q, plus m for Q4_1,
// with no fused multiply-add: built with -ffp-contract=off), then multiplied in float32. Decoding
// a token reads about a sixth of the bytes of float32 weights. Every output row accumulates in the
// same order whatever the number of rows, so results do not depend on the batch.
#include "kernels.h"
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>

namespace {

using namespace gguf;

constexpr int kMaxRows = 64;

#if defined(__AVX512F__)
#include <immintrin.h>

// Two vectors of 16 weights: elements 0..15 and 16..31 of the block.
template <int KIND>
inline void dequantize_block(const uint8_t* q, float d, float m, __m512& w_lo, __m512& w_hi) {
  const __m512 vd = _mm512_set1_ps(d);
  if (KIND == Q8_0) {
    w_lo = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)q))));
    w_hi = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 16)))));
    return;
  }
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)q));
  __m512i lo = _mm512_and_si512(bytes, _mm512_set1_epi32(15));
  __m512i hi = _mm512_srli_epi32(bytes, 4);
  if (KIND == Q4_0) {
    lo = _mm512_sub_epi32(lo, _mm512_set1_epi32(8));
    hi = _mm512_sub_epi32(hi, _mm512_set1_epi32(8));
    w_lo = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(lo));
    w_hi = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(hi));
  } else {  // d * q + m, rounded twice as the reference does (no fused multiply-add)
    const __m512 vm = _mm512_set1_ps(m);
    w_lo = _mm512_add_ps(_mm512_mul_ps(vd, _mm512_cvtepi32_ps(lo)), vm);
    w_hi = _mm512_add_ps(_mm512_mul_ps(vd, _mm512_cvtepi32_ps(hi)), vm);
  }
}

// A tile of R rows of x by C outputs, its R x C accumulators in registers: each dequantized weight
// vector serves R rows and each loaded x vector C outputs, so the loads keep up with the FMAs.
// Every (row, output) accumulates block after block, low half then high half, in one vector:
// the same order whatever the tile, so results do not depend on how many rows are multiplied.
template <int KIND, int R, int C>
inline void tile(const float* x, int64_t K, const uint8_t* q, int64_t row_bytes, const float* scales,
                 const float* mins, float* out, int64_t N) {
  const int64_t num_blocks = K / kBlock;
  const int64_t block_bytes = KIND == Q8_0 ? kBlock : kBlock / 2;
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < num_blocks; ++b) {
    __m512 w_lo[C], w_hi[C];
    for (int c = 0; c < C; ++c)
      dequantize_block<KIND>(q + c * row_bytes + b * block_bytes, scales[c * num_blocks + b],
                             KIND == Q4_1 ? mins[c * num_blocks + b] : 0.f, w_lo[c], w_hi[c]);
    for (int r = 0; r < R; ++r) {
      const __m512 x_lo = _mm512_loadu_ps(x + r * K + b * kBlock), x_hi = _mm512_loadu_ps(x + r * K + b * kBlock + 16);
      for (int c = 0; c < C; ++c) {
        acc[r][c] = _mm512_fmadd_ps(w_lo[c], x_lo, acc[r][c]);
        acc[r][c] = _mm512_fmadd_ps(w_hi[c], x_hi, acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * N + c] = _mm512_reduce_add_ps(acc[r][c]);
}

// The tile of exactly `rows` rows (1..R), its size chosen at compile time.
template <int KIND, int C, int R>
inline void tile_of(int64_t rows, const float* x, int64_t K, const uint8_t* q, int64_t row_bytes, const float* scales,
                    const float* mins, float* out, int64_t N) {
  if constexpr (R > 1)
    if (rows < R) return tile_of<KIND, C, R - 1>(rows, x, K, q, row_bytes, scales, mins, out, N);
  tile<KIND, R, C>(x, K, q, row_bytes, scales, mins, out, N);
}

// The rows in as few passes over the C weight rows as the registers allow, of equal size (13 rows
// as 6 + 7, not 12 + 1): each pass dequantizes the weights again. Up to 12 x C accumulators, plus
// C dequantized pairs and one x pair, fit AVX-512's 32 registers.
template <int KIND, int C>
inline void all_rows(const float* x, int64_t M, int64_t K, const uint8_t* q, int64_t row_bytes, const float* scales,
                     const float* mins, float* out, int64_t N) {
  constexpr int kMostRows = C == 4 ? 4 : 12;
  const int64_t passes = (M + kMostRows - 1) / kMostRows;
  for (int64_t r = 0, pass = 0; pass < passes; ++pass) {
    const int64_t rows = (M - r) / (passes - pass);
    tile_of<KIND, C, kMostRows>(rows, x + r * K, K, q, row_bytes, scales, mins, out + r * N, N);
    r += rows;
  }
}

// Outputs C at a time (4 for up to 4 rows, else 2 so that 12 rows share a pass); their weight rows
// stay in L1 while every group of rows uses them, so a verification forward of 16 tokens streams
// the weights once, as decoding one token does.
template <int KIND, int C>
void outputs_by(const float* x, int64_t M, int64_t K, const uint8_t* qweight, int64_t row_bytes,
                const float* scales, const float* mins, float* out, int64_t N, int64_t n_begin, int64_t n_end) {
  const int64_t num_blocks = K / kBlock;
  int64_t n = n_begin;
  for (; n + C <= n_end; n += C)
    all_rows<KIND, C>(x, M, K, qweight + n * row_bytes, row_bytes, scales + n * num_blocks,
                      KIND == Q4_1 ? mins + n * num_blocks : nullptr, out + n, N);
  for (; n < n_end; ++n)
    all_rows<KIND, 1>(x, M, K, qweight + n * row_bytes, row_bytes, scales + n * num_blocks,
                      KIND == Q4_1 ? mins + n * num_blocks : nullptr, out + n, N);
}

template <int KIND>
void rows_of_output(const float* x, int64_t M, int64_t K, const uint8_t* qweight, int64_t row_bytes,
                    const float* scales, const float* mins, float* out, int64_t N, int64_t n_begin, int64_t n_end) {
  if (M <= 4) outputs_by<KIND, 4>(x, M, K, qweight, row_bytes, scales, mins, out, N, n_begin, n_end);
  else outputs_by<KIND, 2>(x, M, K, qweight, row_bytes, scales, mins, out, N, n_begin, n_end);
}

#else  // portable fallback

template <int KIND>
inline void dequantize_block(const uint8_t* q, float d, float m, float* w) {
  if (KIND == Q8_0) {
    const int8_t* qs = reinterpret_cast<const int8_t*>(q);
    for (int j = 0; j < kBlock; ++j) w[j] = d * static_cast<float>(qs[j]);
    return;
  }
  for (int j = 0; j < kBlock / 2; ++j) {
    const int lo = q[j] & 15, hi = q[j] >> 4;
    if (KIND == Q4_0) {
      w[j] = d * static_cast<float>(lo - 8);
      w[j + 16] = d * static_cast<float>(hi - 8);
    } else {
      w[j] = d * static_cast<float>(lo) + m;
      w[j + 16] = d * static_cast<float>(hi) + m;
    }
  }
}

template <int KIND>
void rows_of_output(const float* x, int64_t M, int64_t K, const uint8_t* qweight, int64_t row_bytes,
                    const float* scales, const float* mins, float* out, int64_t N, int64_t n_begin, int64_t n_end) {
  const int64_t num_blocks = K / kBlock;
  const int64_t block_bytes = KIND == Q8_0 ? kBlock : kBlock / 2;
  float acc[kMaxRows][kBlock];
  float w[kBlock];
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t r = 0; r < M; ++r)
      for (int j = 0; j < kBlock; ++j) acc[r][j] = 0.f;
    const uint8_t* q = qweight + n * row_bytes;
    for (int64_t b = 0; b < num_blocks; ++b) {
      const float m = KIND == Q4_1 ? mins[n * num_blocks + b] : 0.f;
      dequantize_block<KIND>(q + b * block_bytes, scales[n * num_blocks + b], m, w);
      const float* xb = x + b * kBlock;
      for (int64_t r = 0; r < M; ++r)
        for (int j = 0; j < kBlock; ++j) acc[r][j] = std::fma(w[j], xb[r * K + j], acc[r][j]);
    }
    for (int64_t r = 0; r < M; ++r) {
      float sum = 0.f;
      for (int j = 0; j < kBlock; ++j) sum += acc[r][j];
      out[r * N + n] = sum;
    }
  }
}

#endif

}  // namespace

torch::Tensor quantized_matmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor mins,
                               int64_t kind) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be a 2-D float32 tensor");
  TORCH_CHECK(x.size(0) <= kMaxRows, "at most ", kMaxRows, " rows");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(K % kBlock == 0, "K must be a multiple of 32");
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const int64_t row_bytes = qweight.stride(0);
  const float* sp = scales.data_ptr<float>();
  const float* mp = kind == Q4_1 ? mins.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    if (kind == Q4_0) rows_of_output<Q4_0>(xp, M, K, qp, row_bytes, sp, mp, op, N, begin, end);
    else if (kind == Q4_1) rows_of_output<Q4_1>(xp, M, K, qp, row_bytes, sp, mp, op, N, begin, end);
    else rows_of_output<Q8_0>(xp, M, K, qp, row_bytes, sp, mp, op, N, begin, end);
  });
  return out;
}

