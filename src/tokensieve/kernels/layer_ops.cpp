// The small per-layer operations of a decoder, one call each instead of the several PyTorch ops
// (and their dispatch, a few microseconds apiece) they take otherwise: decoding one token of a
// 135M-parameter model spends more time dispatching these than computing them.
//
// rms_norm:  x * rsqrt(mean(x^2) + eps) * weight, row by row.
// rotary:    x * cos + rotate_half(x) * sin, the same products and sum PyTorch computes (this file
//            is built without contracting them into fused multiply-adds), so bit for bit the same.
// store_kv:  new keys and values written to their flat slots in the block pool (keys dimension-major;
//            float32, or float16 rounded to nearest).
// silu_mul:  silu(gate) * up from the fused gate/up projection's output, one pass over its two
//            halves instead of PyTorch's chunk, silu and multiply (silu(g) = g / (1 + e^-g), with
//            the attention kernel's e^x: within 1e-6 of PyTorch's, not bit for bit).
#include "kernels.h"
#include "vector_math.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32, "rms_norm takes float32");
  const int64_t dim = weight.numel();
  TORCH_CHECK(x.size(-1) == dim && weight.is_contiguous(), "x's last dim must match the weight");
  auto rows = x.contiguous();
  auto out = torch::empty_like(rows);
  const float* in = rows.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  for (int64_t r = 0, n = rows.numel() / dim; r < n; ++r, in += dim, o += dim) {
    alignas(64) float lanes[16] = {};  // x^2 summed in 16 lanes (entry i in lane i % 16), then pairwise
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 sums = _mm512_setzero_ps();
    for (; i + 16 <= dim; i += 16) {
      const __m512 v = _mm512_loadu_ps(in + i);
      sums = _mm512_add_ps(sums, _mm512_mul_ps(v, v));
    }
    _mm512_store_ps(lanes, sums);
#endif
    for (; i < dim; ++i) lanes[i % 16] += in[i] * in[i];
    for (int width = 8; width >= 1; width /= 2)
      for (int lane = 0; lane < width; ++lane) lanes[lane] += lanes[lane + width];
    const float inverse = 1.f / std::sqrt(lanes[0] / static_cast<float>(dim) + feps);
    i = 0;
#if defined(__AVX512F__)
    for (const __m512 scale = _mm512_set1_ps(inverse); i + 16 <= dim; i += 16)
      _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_loadu_ps(w + i), _mm512_mul_ps(_mm512_loadu_ps(in + i), scale)));
#endif
    for (; i < dim; ++i) o[i] = w[i] * (in[i] * inverse);
  }
  return out;
}

torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat32 && x.stride(2) == 1,
              "x must be float32 [tokens, heads, dim] with unit stride in dim");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  TORCH_CHECK(dim % 2 == 0, "the head dim must be even");
  auto c = cos.reshape({tokens, dim}).contiguous(), s = sin.reshape({tokens, dim}).contiguous();
  TORCH_CHECK(c.scalar_type() == torch::kFloat32 && s.scalar_type() == torch::kFloat32, "cos and sin must be float32");
  auto out = torch::empty({tokens, heads, dim}, x.options());
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      const float* in = x.data_ptr<float>() + t * x.stride(0) + h * x.stride(1);
      const float* ct = cp + t * dim;
      const float* st = sp + t * dim;
      float* o = op + (t * heads + h) * dim;
      for (int64_t i = 0; i < half; ++i) o[i] = in[i] * ct[i] + -in[i + half] * st[i];
      for (int64_t i = half; i < dim; ++i) o[i] = in[i] * ct[i] + in[i - half] * st[i];
    }
  return out;
}

void store_kv(torch::Tensor key_pool, torch::Tensor value_pool, torch::Tensor slots, torch::Tensor keys,
              torch::Tensor values) {
  const auto pool_type = key_pool.scalar_type();
  TORCH_CHECK((pool_type == torch::kFloat32 || pool_type == torch::kFloat16) && value_pool.scalar_type() == pool_type &&
                  key_pool.is_contiguous() && key_pool.dim() == 3 && value_pool.is_contiguous() && value_pool.dim() == 3,
              "the pools must be contiguous float32 or float16 [blocks, dim, block_size] (keys) and [blocks, block_size, dim] (values)");
  const int64_t dim = key_pool.size(1), block_size = key_pool.size(2), num_slots = key_pool.size(0) * block_size;
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous(), "slots must be contiguous int64");
  for (const auto& t : {keys, values})
    TORCH_CHECK(t.dim() == 3 && t.scalar_type() == torch::kFloat32 && t.size(2) == dim && t.stride(2) == 1 &&
                    t.size(0) * t.size(1) == slots.numel(),
                "keys and values must be float32 [tokens, kv_heads, dim] with unit stride in dim, one slot each");
  const int64_t heads = keys.size(1);
  const int64_t* slot = slots.data_ptr<int64_t>();
  // a float16 pool takes each value rounded to nearest, as torch's .half() does
  auto store = [&](auto* kp, auto* vp) {
    using T = std::remove_pointer_t<decltype(kp)>;
    for (int64_t i = 0; i < slots.numel(); ++i) {
      TORCH_CHECK(slot[i] >= 0 && slot[i] < num_slots, "slot ", slot[i], " is outside the pool");
      const int64_t t = i / heads, h = i % heads;
      const float* k = keys.data_ptr<float>() + t * keys.stride(0) + h * keys.stride(1);
      const float* v = values.data_ptr<float>() + t * values.stride(0) + h * values.stride(1);
      T* key_column = kp + (slot[i] / block_size) * dim * block_size + slot[i] % block_size;
      for (int64_t d = 0; d < dim; ++d) key_column[d * block_size] = static_cast<T>(k[d]);
      std::transform(v, v + dim, vp + slot[i] * dim, [](float x) { return static_cast<T>(x); });
    }
  };
  if (pool_type == torch::kFloat16)
    store(key_pool.data_ptr<c10::Half>(), value_pool.data_ptr<c10::Half>());
  else
    store(key_pool.data_ptr<float>(), value_pool.data_ptr<float>());
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.scalar_type() == torch::kFloat32 && gate_up.size(1) % 2 == 0,
              "gate_up must be float32 [rows, 2 * intermediate]");
  auto in = gate_up.contiguous();
  const int64_t rows = in.size(0), width = in.size(1) / 2;
  auto out = torch::empty({rows, width}, in.options());
  const float* ip = in.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // rows split across threads only when there are enough of them (a prefill, not a decode step)
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = ip + r * 2 * width;
      const float* up = gate + width;
      float* o = op + r * width;
      int64_t i = 0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.f);
      for (; i + 16 <= width; i += 16) {
        const __m512 g = _mm512_loadu_ps(gate + i);
        const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp_lanes(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_storeu_ps(o + i, _mm512_mul_ps(silu, _mm512_loadu_ps(up + i)));
      }
#endif
      for (; i < width; ++i) o[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    }
  });
  return out;
}
