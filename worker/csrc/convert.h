// Element conversions to and from float32 that the compiler vectorizes, and the dtype dispatch every kernel shares.
// c10::BFloat16's own float -> bf16 cast branches on NaN and stayed scalar: SiLU over a 256-token prefill ran at
// 1.6 ns an element, a third of a layer.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <bit>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace tandem {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return std::bit_cast<float>(static_cast<uint32_t>(x.x) << 16); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

template <typename scalar_t>
scalar_t from_float(float x);

template <>
inline float from_float<float>(float x) {
  return x;
}

// Round to nearest even, NaN to the quiet NaN 0x7FC0: the same bits as c10's conversion, without its branch.
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(x != x ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

template <>
inline c10::Half from_float<c10::Half>(float x) {
  return c10::Half(x);
}

#if defined(__AVX512F__)
// 16 consecutive elements as float32 lanes.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 is the top half of a float32
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// Calls body(scalar_t{}) for `like`'s dtype: the three every kernel here takes; others are refused by name.
template <typename Body>
void dispatch_float_types(const at::Tensor& like, const char* name, Body&& body) {
  switch (like.scalar_type()) {
    case at::kFloat:
      return body(float{});
    case at::kBFloat16:
      return body(c10::BFloat16{});
    case at::kHalf:
      return body(c10::Half{});
    default:
      TORCH_CHECK(false, name, " takes float32, bfloat16 or float16, not ", like.scalar_type());
  }
}

}  // namespace tandem
