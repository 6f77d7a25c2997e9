// Vector math shared by the kernels: one function for every lane, so that a value's result does not
// depend on its neighbours (a row's result never depends on the batch).
#pragma once
#include <limits>
#if defined(__AVX512F__)
#include <immintrin.h>

// e^x lane by lane (Cephes' expf: x = n ln 2 + r, a degree-7 polynomial in r, times 2^n); e^-inf = 0.
inline __m512 exp_lanes(__m512 x) {
  const __mmask16 finite = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_NEQ_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // e^-104 is below the smallest float: the result is 0 all the same
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(finite, _mm512_scalef_ps(p, n));
}

#endif
