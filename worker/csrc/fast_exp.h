// exp(x) written so the compiler vectorizes it: a call to expf does not (in the attention kernel it was a quarter
// of the time). Shared by the kernels in this folder (worker/native.py compiles them into one library).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

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

}  // namespace tandem
