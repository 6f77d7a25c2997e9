// KIVI's quantization of full KV blocks, as engine/kv_quantization.py does it (the same float32 steps,
// so the same codes): each group of consecutive elements of a row gets a float16 scale (its range over
// 2^bits - 1 levels) and zero (its min), and codes round((x - zero) / scale) to nearest even, clamped;
// int4 codes two to a byte, the even element in the low nibble.
#include "kernels.h"
#include <algorithm>
#include <cfloat>
#include <cmath>

void quantize_into(torch::Tensor source, torch::Tensor source_ids, torch::Tensor codes, torch::Tensor scale, torch::Tensor zero,
                   torch::Tensor destination_ids, int64_t bits) {
  TORCH_CHECK(bits == 8 || bits == 4, "quantized KV blocks have 8 or 4 bits, got ", bits);
  TORCH_CHECK(source.scalar_type() == torch::kFloat32 && source.is_contiguous() && source.dim() == 3, "source must be contiguous float32 [blocks, rows, elements]");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.dim() == 3 && codes.size(1) == source.size(1) &&
                  codes.size(2) * 8 / bits == source.size(2),
              "codes must be contiguous uint8 [blocks, rows, elements * bits / 8]");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat16 && zero.scalar_type() == torch::kFloat16 && scale.is_contiguous() &&
                  zero.is_contiguous() && scale.sizes() == zero.sizes() && scale.size(0) == codes.size(0) &&
                  scale.size(1) == source.size(1) && source.size(2) % scale.size(2) == 0,
              "scale and zero must be contiguous float16 [blocks, rows, groups]");
  TORCH_CHECK(source_ids.scalar_type() == torch::kInt64 && destination_ids.scalar_type() == torch::kInt64 &&
                  source_ids.is_contiguous() && destination_ids.is_contiguous() && source_ids.numel() == destination_ids.numel(),
              "source_ids and destination_ids must be contiguous int64 of one length");
  const int64_t rows = source.size(1), elements = source.size(2), groups = scale.size(2), group = elements / groups;
  TORCH_CHECK(group % 2 == 0, "groups must have an even number of elements");
  const float levels = static_cast<float>((1 << bits) - 1);
  const int64_t* from = source_ids.data_ptr<int64_t>();
  const int64_t* to = destination_ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < source_ids.numel(); ++i) {
    TORCH_CHECK(from[i] >= 0 && from[i] < source.size(0) && to[i] >= 0 && to[i] < codes.size(0), "a block id is outside its pool");
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        const float* x = source.data_ptr<float>() + (from[i] * rows + r) * elements + g * group;
        const int64_t at = (to[i] * rows + r) * groups + g;
        const auto [low, high] = std::minmax_element(x, x + group);
        const c10::Half s(static_cast<float>((*high - *low) / levels)), z(*low);
        scale.data_ptr<c10::Half>()[at] = s;
        zero.data_ptr<c10::Half>()[at] = z;
        const float step = std::max(static_cast<float>(s), FLT_MIN), base = static_cast<float>(z);
        uint8_t* out = codes.data_ptr<uint8_t>() + (to[i] * rows + r) * elements * bits / 8 + g * group * bits / 8;
        for (int64_t e = 0; e < group; ++e) {
          const auto code = static_cast<uint8_t>(std::clamp(std::nearbyint((x[e] - base) / step), 0.f, levels));
          if (bits == 8)
            out[e] = code;
          else if (e % 2 == 0)
            out[e / 2] = code;
          else
            out[e / 2] |= code << 4;
        }
      }
  }
}
