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

constexpr int kBlock = 32;
constexpr int kMaxRows = 64;
enum Kind { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };

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

// ROWS rows of x at once, their accumulators in registers.
template <int KIND, int ROWS>
void row_group(const float* x, int64_t K, const uint8_t* qweight, int64_t row_bytes, const float* scales,
               const float* mins, float* out, int64_t N, int64_t n_begin, int64_t n_end) {
  const int64_t num_blocks = K / kBlock;
  const int64_t block_bytes = KIND == Q8_0 ? kBlock : kBlock / 2;
  for (int64_t n = n_begin; n < n_end; ++n) {
    __m512 acc_lo[ROWS], acc_hi[ROWS];
    for (int r = 0; r < ROWS; ++r) acc_lo[r] = acc_hi[r] = _mm512_setzero_ps();
    const uint8_t* q = qweight + n * row_bytes;
    for (int64_t b = 0; b < num_blocks; ++b) {
      __m512 w_lo, w_hi;
      const float m = KIND == Q4_1 ? mins[n * num_blocks + b] : 0.f;
      dequantize_block<KIND>(q + b * block_bytes, scales[n * num_blocks + b], m, w_lo, w_hi);
      const float* xb = x + b * kBlock;
      for (int r = 0; r < ROWS; ++r) {
        acc_lo[r] = _mm512_fmadd_ps(w_lo, _mm512_loadu_ps(xb + r * K), acc_lo[r]);
        acc_hi[r] = _mm512_fmadd_ps(w_hi, _mm512_loadu_ps(xb + r * K + 16), acc_hi[r]);
      }
    }
    for (int r = 0; r < ROWS; ++r) out[r * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc_lo[r], acc_hi[r]));
  }
}

template <int KIND>
void rows_of_output(const float* x, int64_t M, int64_t K, const uint8_t* qweight, int64_t row_bytes,
                    const float* scales, const float* mins, float* out, int64_t N, int64_t n_begin, int64_t n_end) {
  int64_t r = 0;
  for (; r + 4 <= M; r += 4) row_group<KIND, 4>(x + r * K, K, qweight, row_bytes, scales, mins, out + r * N, N, n_begin, n_end);
  if (r + 2 <= M) { row_group<KIND, 2>(x + r * K, K, qweight, row_bytes, scales, mins, out + r * N, N, n_begin, n_end); r += 2; }
  if (r < M) row_group<KIND, 1>(x + r * K, K, qweight, row_bytes, scales, mins, out + r * N, N, n_begin, n_end);
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

