// Horizontal reductions of 16 vectors at once: lane i of the result reduces v[i]'s 16 lanes. Reducing each vector on
// its own takes ~8 shuffles and operations; 16 together share them (31 in all).
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

namespace tandem {

// By a fixed tree (halves, quarters, pairs, lanes), so the result's bits depend only on v; combine: add or max.
template <typename Combine>
inline __m512 reduce_lanes_of_16(const __m512* v, Combine&& combine) {
  __m512 halves[8], quarters[4], pairs[2];
  for (int j = 0; j < 8; ++j)  // 256-bit halves of v[2j] | v[2j+1] combined: 8 partials per vector
    halves[j] = combine(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44),
                        _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xEE));
  for (int j = 0; j < 4; ++j)  // 128-bit lane c now holds vector 4j + c's 4 partials
    quarters[j] = combine(_mm512_shuffle_f32x4(halves[2 * j], halves[2 * j + 1], 0x88),
                          _mm512_shuffle_f32x4(halves[2 * j], halves[2 * j + 1], 0xDD));
  for (int j = 0; j < 2; ++j)  // lane c: vectors 8j + c and 8j + 4 + c, two partials each
    pairs[j] = combine(_mm512_shuffle_ps(quarters[2 * j], quarters[2 * j + 1], 0x44),
                       _mm512_shuffle_ps(quarters[2 * j], quarters[2 * j + 1], 0xEE));
  // Element 4c + p: vector c + 4p's result; a 4x4 transpose puts vector i's in element i.
  const __m512 all = combine(_mm512_shuffle_ps(pairs[0], pairs[1], 0x88), _mm512_shuffle_ps(pairs[0], pairs[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, all);
}

inline __m512 sum_lanes_of_16(const __m512* v) {
  return reduce_lanes_of_16(v, [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); });
}

inline __m512 max_lanes_of_16(const __m512* v) {
  return reduce_lanes_of_16(v, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); });
}

}  // namespace tandem
#endif
