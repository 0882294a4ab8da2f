// exp(x) written so the compiler vectorizes it: a call to expf does not (in the attention kernel it was a quarter
// of the time). Shared by the kernels in this folder (worker/native.py compiles them into one library).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace tandem {

// 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2] and p the degree-6 Taylor polynomial: within 2 ulp of expf.
// x is clamped to [-87, 88], where 2^n stays a normal float: below, the result is ~1e-38 instead of smaller or 0
// (nothing beside the 1 or more it is added to, in a softmax or in 1 + exp(-x)); above, ~1.6e38 instead of inf.
#pragma omp declare simd notinbranch
inline float exp_clamped(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693145751953125f;  // ln2 in two parts (Cody-Waite), so r keeps its low bits
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) << 23;  // times 2^n, by the exponent field
  float result;
  std::memcpy(&result, &bits, sizeof result);
  return result;
}

#if defined(__AVX512F__)
// exp_clamped on 16 lanes, the same steps.
inline __m512 exp16_clamped(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  const __m512i bits = _mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23));
  return _mm512_castsi512_ps(bits);
}
#endif

}  // namespace tandem
