// The k largest logits of each row, as token ids: best first, a tie going to the lower id (so column
// 0 is exactly what argmax returns). One pass per row: the row's best k so far are kept sorted, and
// 16 logits at a time are compared with the k-th best; only a logit above it is inserted, which after
// the first few hundred of a row's tens of thousands is rare.
#include "kernels.h"
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Sort (value, id) into the sorted arrays best[0..last), dropping what was at `last`; ids arrive in
// increasing order, so an equal value already kept stays ahead of it.
inline void insert(float value, int64_t id, float* best, int64_t* ids, int64_t last) {
  int64_t at = last;
  while (at > 0 && value > best[at - 1]) {
    best[at] = best[at - 1];
    ids[at] = ids[at - 1];
    --at;
  }
  best[at] = value;
  ids[at] = id;
}

// Insert (value, id) into the sorted best-k arrays if it beats the k-th.
inline void offer(float value, int64_t id, float* best, int64_t* ids, int64_t k) {
  if (value > best[k - 1]) insert(value, id, best, ids, k - 1);
}

void top_of_row(const float* row, int64_t vocab, int64_t k, int64_t* ids) {
  float best[64];
  int64_t v = 0;
  for (; v < k; ++v) insert(row[v], v, best, ids, v);  // the first k logits, sorted in (-inf ones too)
#if defined(__AVX512F__)
  for (; v + 16 <= vocab; v += 16) {
    __mmask16 above = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + v), _mm512_set1_ps(best[k - 1]), _CMP_GT_OQ);
    while (above) {
      int lane = __builtin_ctz(above);
      offer(row[v + lane], v + lane, best, ids, k);
      above &= above - 1;
    }
  }
#endif
  for (; v < vocab; ++v) offer(row[v], v, best, ids, k);
}

}  // namespace

torch::Tensor top_tokens(torch::Tensor logits, int64_t k) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32, "logits must be a 2-D float32 tensor");
  TORCH_CHECK(k >= 1 && k <= 64 && k <= logits.size(1), "k must be in [1, min(64, vocab)], got ", k);
  auto rows = logits.contiguous();
  const int64_t num_rows = rows.size(0), vocab = rows.size(1);
  auto out = torch::empty({num_rows, k}, torch::kInt64);
  const float* data = rows.data_ptr<float>();
  int64_t* ids = out.data_ptr<int64_t>();
  at::parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) top_of_row(data + r * vocab, vocab, k, ids + r * k);
  });
  return out;
}
