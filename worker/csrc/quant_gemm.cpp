// x @ W.T for int4 and int8 weights, fast from 1 row to a full batch (worker/quant.py packs the weights).
//
// torch's CPU int4/int8 kernels are matrix-vector kernels: they unpack the weights again for every 4 rows, so from
// ~16 rows up a step on them was slower than oneDNN's bf16 matmul over the dequantized weights (bench/step.py), and
// the default GGUF start lost to `--quantize none` under load. Here a tile of 16 output columns is unpacked once per
// 8 rows and multiplied on AVX512-BF16 dot products (vdpbf16ps): codes become exact bf16 integers, products with
// the bf16 activations are exact, sums run in float32; scales (and int4's zero points) are applied per group in
// float32. Every output element sums its group's products in one fixed order whatever the number of rows or the
// threads, so a row's result does not depend on its batch.
//
// int4 weights also run against int8 activations (w4a8_gemm, below): AVX512-VNNI integer dot products, for int4
// groups of whole blocks of 32.
//
// Layouts (built by worker/quant.py):
//   int4: packed uint8 [N / 16, K / 4, 32]: byte 2j + e of k-quad q holds, for column j of the tile, the code of
//         k = 4q + e in its low nibble and of k = 4q + 2 + e in its high nibble; codes 0..15 stand for code - 8.
//         scales, zeros float32 [N / 16, K / group, 16]: w = (code - 8) * scale + zero.
//   int8: packed int8 [N / 16, K / 2, 32]: element 2j + e of k-pair p is column j's code of k = 2p + e.
//         scales float32 [N]: w = code * scale.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "convert.h"
#include "lanes.h"

namespace {

constexpr int64_t COLUMNS = 16;  // a tile: one vector of float32 sums
constexpr int ROWS = 8;          // rows per pass over a tile

bool quant_gemm_supported() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

bool w4a8_supported() {
#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// packed [N / 16, entries, entry_bytes], each entry holding k_per_entry values of k for the tile's 16 columns.
void check_common(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& out, int64_t k_per_entry,
                  int64_t entry_bytes = 32) {
  TORCH_CHECK(quant_gemm_supported(), "int4/int8 gemm needs AVX512-BF16 (this build has none)");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(),
              "x must be contiguous bf16 [rows, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.size(2) == entry_bytes &&
                  packed.size(1) * k_per_entry == x.size(1),
              "packed weight does not match x's K");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.dim() == 2 &&
                  out.size(0) == x.size(0) && out.size(1) == packed.size(0) * COLUMNS,
              "out must be contiguous bf16 [rows, N]");
}

// int8 weights' scales, one per output column.
void check_row_scales(const at::Tensor& scales, int64_t tiles) {
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == tiles * COLUMNS,
              "scales must be contiguous float32 [N]");
}

// int4 weights' per-group scales and zero points, as worker/quant.py lays them out.
void check_group_params(const at::Tensor& scales, const at::Tensor& zeros, int64_t tiles, int64_t groups) {
  TORCH_CHECK(scales.scalar_type() == at::kFloat && zeros.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  zeros.is_contiguous() && scales.numel() == tiles * groups * COLUMNS &&
                  zeros.numel() == scales.numel(),
              "scales and zeros must be contiguous float32 [N / 16, K / group, 16]");
}

#if defined(__AVX512BF16__)
// Calls pass(std::integral_constant<int, N>) with N = n in [1, ROWS]: register arrays sized at compile time.
template <int N = ROWS, typename Pass>
void with_rows(int64_t n, Pass&& pass) {
  if constexpr (N >= 1) {
    if (n == N) return pass(std::integral_constant<int, N>{});
    with_rows<N - 1>(n, pass);
  }
}

inline __m512bh pair_of(const c10::BFloat16* x) {  // x[0], x[1] in every 32-bit lane
  int32_t bits;
  std::memcpy(&bits, x, sizeof bits);
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(bits));
}

inline void store_bf16(c10::BFloat16* out, __m512 sums) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(sums)));
}

// How the products are summed, the same in both paths below, so a row's bits never depend on which one ran: for
// each group of pairs, partial = the group's dot products in k order (vdpbf16ps, float32), then
// sums = finish(tile, group, row, partial, sums) applies the group's scale (and zero point).
//
// Up to ROWS rows (decoding a few sequences: weight bytes are the cost): each k-quad of a tile is unpacked in
// registers and used at once. More rows (compute is the cost): TILES tiles are unpacked once into panels in the
// CPU's cache, one vector per k-pair, then read by ROWS rows at a time: TILES x ROWS independent sums keep the dot
// product units busy (with 8, their latency left a third of them idle) and share each row's broadcast.
constexpr int TILES = 2;
constexpr int PANEL_ROWS = 8;  // 2 x 8 partials (6 rows: 1.1-1.3x slower at 16-64 rows)

template <int T, typename Finish>
void multiply_panels(const __m512bh* const* panels, const c10::BFloat16* x, int64_t rows, int64_t k_len,
                     int64_t groups, int64_t pairs_per_group, c10::BFloat16* out, int64_t out_stride,
                     Finish&& finish) {
  for (int64_t r0 = 0; r0 < rows; r0 += PANEL_ROWS) {
    with_rows<PANEL_ROWS>(std::min<int64_t>(PANEL_ROWS, rows - r0), [&](auto count) {
      constexpr int R = decltype(count)::value;
      __m512 sums[T][R];
      for (int i = 0; i < T; ++i)
        for (int r = 0; r < R; ++r) sums[i][r] = _mm512_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        __m512 partial[T][R];
        for (int i = 0; i < T; ++i)
          for (int r = 0; r < R; ++r) partial[i][r] = _mm512_setzero_ps();
        for (int64_t p = g * pairs_per_group; p < (g + 1) * pairs_per_group; ++p) {
          for (int r = 0; r < R; ++r) {
            const __m512bh pair = pair_of(x + (r0 + r) * k_len + 2 * p);
            for (int i = 0; i < T; ++i) partial[i][r] = _mm512_dpbf16_ps(partial[i][r], panels[i][p], pair);
          }
        }
        for (int i = 0; i < T; ++i)
          for (int r = 0; r < R; ++r) sums[i][r] = finish(i, g, r0 + r, partial[i][r], sums[i][r]);
      }
      for (int i = 0; i < T; ++i)
        for (int r = 0; r < R; ++r) store_bf16(out + (r0 + r) * out_stride + i * COLUMNS, sums[i][r]);
    });
  }
}

// Runs `unpack(tile, panel)` and multiply_panels over the tiles in [begin, end), TILES at a time (an odd last one
// alone); scratch: one panel of `pairs` vectors per tile.
template <typename Unpack, typename Finish>
void panel_tiles(int64_t begin, int64_t end, int64_t pairs, const c10::BFloat16* x, int64_t rows, int64_t k_len,
                 int64_t groups, int64_t pairs_per_group, c10::BFloat16* out, int64_t out_stride, Unpack&& unpack,
                 Finish&& finish) {
  std::vector<__m512bh> scratch(TILES * pairs);
  const __m512bh* panels[TILES];
  for (int i = 0; i < TILES; ++i) panels[i] = scratch.data() + i * pairs;
  for (int64_t t = begin; t < end; t += TILES) {
    const int64_t count = std::min<int64_t>(TILES, end - t);
    for (int64_t i = 0; i < count; ++i) unpack(t + i, scratch.data() + i * pairs);
    if (count == TILES) {
      auto finish_tile = [&](int i, int64_t g, int64_t row, __m512 partial, __m512 sums) {
        return finish(t + i, g, row, partial, sums);
      };
      multiply_panels<TILES>(panels, x, rows, k_len, groups, pairs_per_group, out + t * COLUMNS, out_stride,
                             finish_tile);
      continue;
    }
    for (int64_t i = 0; i < count; ++i) {  // the last tiles, one at a time
      auto finish_tile = [&](int, int64_t g, int64_t row, __m512 partial, __m512 sums) {
        return finish(t + i, g, row, partial, sums);
      };
      multiply_panels<1>(panels + i, x, rows, k_len, groups, pairs_per_group, out + (t + i) * COLUMNS, out_stride,
                         finish_tile);
    }
  }
}

// Both integer gemms: the tiles in parallel, each multiplied straight from registers (up to ROWS rows) or from
// panels (more rows). unpack(t, s, weights) writes step s of tile t: its STEP k-pairs as bf16 vectors (int4: a
// quad's 2 pairs from one load; int8: 1 pair). Both paths sum each row's products in the same order.
template <int STEP, typename Unpack, typename Finish>
void gemm_tiles(int64_t tiles, const c10::BFloat16* x, int64_t rows, int64_t k_len, int64_t groups,
                c10::BFloat16* out, Unpack&& unpack, Finish&& finish) {
  const int64_t pairs = k_len / 2, pairs_per_group = pairs / groups, steps_per_group = pairs_per_group / STEP;
  const int64_t out_stride = tiles * COLUMNS;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    if (rows > ROWS) {
      auto unpack_panel = [&](int64_t t, __m512bh* panel) {
        for (int64_t s = 0; s < pairs / STEP; ++s) unpack(t, s, panel + s * STEP);
      };
      panel_tiles(begin, end, pairs, x, rows, k_len, groups, pairs_per_group, out, out_stride, unpack_panel, finish);
      return;
    }
    for (int64_t t = begin; t < end; ++t) {
      with_rows(rows, [&](auto count) {
        constexpr int R = decltype(count)::value;
        __m512 sums[R];
        for (int r = 0; r < R; ++r) sums[r] = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; ++g) {
          __m512 partial[R];
          for (int r = 0; r < R; ++r) partial[r] = _mm512_setzero_ps();
          for (int64_t s = g * steps_per_group; s < (g + 1) * steps_per_group; ++s) {
            __m512bh weights[STEP];
            unpack(t, s, weights);
            for (int r = 0; r < R; ++r)
              for (int i = 0; i < STEP; ++i)
                partial[r] = _mm512_dpbf16_ps(partial[r], weights[i], pair_of(x + r * k_len + 2 * (s * STEP + i)));
          }
          for (int r = 0; r < R; ++r) sums[r] = finish(t, g, r, partial[r], sums[r]);
        }
        for (int r = 0; r < R; ++r) store_bf16(out + r * out_stride + t * COLUMNS, sums[r]);
      });
    }
  });
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
// ---- int4 weights x int8 activations (W4A8) on AVX512-VNNI -----------------------------------------------------
//
// The activations are quantized per row and per block of 32 k (as llama.cpp's Q8_1 blocks): scale = max |x| / 127,
// codes rounded to nearest. vpdpbusd then sums 4 products of unsigned weight codes (0..15) and signed activation codes
// into int32 lanes, exactly: twice the multiplies per instruction of vdpbf16ps, and no float rounding inside a block.
// Per block and column: sums += float(block dot) * (weight scale * x scale) + (zero - 8 * weight scale) * (x scale *
// sum of x codes), in k order, the same in every path, so a row's bits never depend on its batch.
constexpr int64_t ACT_BLOCK = 32;
constexpr int W8_TILES = 2;
constexpr int W8_ROWS = 6;  // 2 tiles x 6 rows: 12 int32 dots and 12 float32 sums in registers

// x [rows, K] bf16 quantized per row and block of 32: codes int8 [rows, K]; per (row, block) the scale, the sum of
// the codes and scale * that sum. rows(r0) points at row r0's, for a pass over the rows from there.
struct QuantizedRows {
  int64_t k_len, blocks;
  std::vector<int8_t> codes;
  std::vector<float> scales, scaled_sums;
  std::vector<int32_t> sums;

  struct From {
    const int8_t* codes;
    const float* scales;
    const float* scaled_sums;
    const int32_t* sums;
  };

  explicit QuantizedRows(const at::Tensor& x)
      : k_len(x.size(1)), blocks(x.size(1) / ACT_BLOCK), codes(x.size(0) * k_len), scales(x.size(0) * blocks),
        scaled_sums(scales.size()), sums(scales.size()) {
    const c10::BFloat16* data = x.data_ptr<c10::BFloat16>();
    at::parallel_for(0, x.size(0), 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        int64_t b = 0;
        for (; b + 16 <= blocks; b += 16) quantize<16>(data, r, b);
        for (; b < blocks; ++b) quantize<1>(data, r, b);
      }
    });
  }

  // Blocks b .. b + N - 1 of row r, N = 16 or 1: 16 blocks' peaks and code sums are reduced together
  // (tandem::max_lanes_of_16), one block alone on its own lanes. Max and integer sums are exact in any order: both
  // give a block the same codes, scale and sums.
  template <int N>
  void quantize(const c10::BFloat16* data, int64_t r, int64_t b) {
    const c10::BFloat16* in = data + r * k_len + b * ACT_BLOCK;
    alignas(64) float peaks[16], inverses[16], code_sums[16];
    if constexpr (N == 16) {
      __m512 absolute[16];
      for (int j = 0; j < 16; ++j)
        absolute[j] = _mm512_max_ps(_mm512_abs_ps(tandem::load16(in + j * ACT_BLOCK)),
                                    _mm512_abs_ps(tandem::load16(in + j * ACT_BLOCK + 16)));
      const __m512 peak = tandem::max_lanes_of_16(absolute);
      _mm512_store_ps(peaks, peak);
      // 127 / peak where peak > 0, else 0: IEEE division, the same bits as one lane at a time.
      _mm512_store_ps(inverses, _mm512_maskz_div_ps(_mm512_cmp_ps_mask(peak, _mm512_setzero_ps(), _CMP_GT_OQ),
                                                    _mm512_set1_ps(127.0f), peak));
    } else {
      const __m512 absolute = _mm512_max_ps(_mm512_abs_ps(tandem::load16(in)), _mm512_abs_ps(tandem::load16(in + 16)));
      peaks[0] = _mm512_reduce_max_ps(absolute);
      inverses[0] = peaks[0] > 0.0f ? 127.0f / peaks[0] : 0.0f;
    }
    __m512 block_sums[16];
    for (int j = 0; j < N; ++j) {
      __m512i sum = _mm512_setzero_si512();
      for (int h = 0; h < 2; ++h) {
        const __m512 v = tandem::load16(in + j * ACT_BLOCK + 16 * h);
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inverses[j])));  // nearest, even ties
        sum = _mm512_add_epi32(sum, q);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes.data() + r * k_len + (b + j) * ACT_BLOCK + 16 * h),
                         _mm512_cvtsepi32_epi8(q));
      }
      block_sums[j] = _mm512_cvtepi32_ps(sum);  // |sum| <= 32 * 127: exact in float32
    }
    if constexpr (N == 16)
      _mm512_store_ps(code_sums, tandem::sum_lanes_of_16(block_sums));
    else
      code_sums[0] = _mm512_reduce_add_ps(block_sums[0]);
    for (int j = 0; j < N; ++j) {
      const int64_t at = r * blocks + b + j;
      scales[at] = peaks[j] / 127.0f;
      sums[at] = static_cast<int32_t>(code_sums[j]);
      scaled_sums[at] = scales[at] * code_sums[j];
    }
  }

  From rows(int64_t r0) const {
    return {codes.data() + r0 * k_len, scales.data() + r0 * blocks, scaled_sums.data() + r0 * blocks,
            sums.data() + r0 * blocks};
  }
};

// Calls pass(std::integral_constant<int, R>, r0) for each pass of up to W8_ROWS rows, r0 its first.
template <typename Pass>
void row_passes(int64_t rows, Pass&& pass) {
  for (int64_t r0 = 0; r0 < rows; r0 += W8_ROWS)
    with_rows<W8_ROWS>(std::min<int64_t>(W8_ROWS, rows - r0), [&](auto n) { pass(n, r0); });
}

// One quad of a tile (worker/quant.py's int4 layout) as 16 lanes of 4 unsigned codes, k = 4q .. 4q + 3 in order.
inline __m512i unsigned_quad(const uint8_t* bytes) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
  const __m512i nibbles = _mm512_set1_epi32(0x0F0F);
  const __m512i low = _mm512_and_si512(wide, nibbles);                          // k = 4q, 4q + 1
  const __m512i high = _mm512_and_si512(_mm512_srli_epi32(wide, 4), nibbles);  // k = 4q + 2, 4q + 3
  return _mm512_or_si512(low, _mm512_slli_epi32(high, 16));
}

// dots[i][r] += tile i's weights . row r's codes over block b's 8 quads, in k order; quad(i, q): tile i's quad q as
// 16 lanes of 4 unsigned weights. A fixed count, unrolled, inlined: the dots stay in their registers. As a loop over
// q, GCC copied every dot between registers on each step, and the int4 x int8 kernel ran 1.25-1.4x slower.
template <int T, int R, typename Quad>
__attribute__((always_inline)) inline void block_dots(Quad&& quad, const int8_t* codes, int64_t k_len, int64_t b,
                                                      __m512i (&dots)[T][R]) {
#pragma GCC unroll 8
  for (int j = 0; j < ACT_BLOCK / 4; ++j) {
    const int64_t q = b * (ACT_BLOCK / 4) + j;
    __m512i weights[T];
    for (int i = 0; i < T; ++i) weights[i] = quad(i, q);
    for (int r = 0; r < R; ++r) {
      int32_t x_quad;
      std::memcpy(&x_quad, codes + r * k_len + 4 * q, sizeof x_quad);
      const __m512i x4 = _mm512_set1_epi32(x_quad);
      for (int i = 0; i < T; ++i) dots[i][r] = _mm512_dpbusd_epi32(dots[i][r], weights[i], x4);
    }
  }
}

// quad(i, q): tile i's quad q as unsigned_quad gives it (from a panel, or unpacked on the spot).
template <int T, int R, typename Quad>
void w4a8_pass(Quad&& quad, const QuantizedRows::From& x, int64_t k_len, int64_t group_blocks,
               const float* const* w_scales, const float* const* w_zeros, c10::BFloat16* out, int64_t out_stride) {
  const int64_t blocks = k_len / ACT_BLOCK;
  __m512 sums[T][R];
  for (int i = 0; i < T; ++i)
    for (int r = 0; r < R; ++r) sums[i][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i dots[T][R];
    for (int i = 0; i < T; ++i)
      for (int r = 0; r < R; ++r) dots[i][r] = _mm512_setzero_si512();
    block_dots(quad, x.codes, k_len, b, dots);
    const int64_t g = b / group_blocks;
    for (int i = 0; i < T; ++i) {
      const __m512 scale = _mm512_loadu_ps(w_scales[i] + g * COLUMNS);
      const __m512 zero = _mm512_loadu_ps(w_zeros[i] + g * COLUMNS);
      for (int r = 0; r < R; ++r) {
        const __m512 both = _mm512_mul_ps(scale, _mm512_set1_ps(x.scales[r * blocks + b]));
        sums[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[i][r]), both, sums[i][r]);
        sums[i][r] = _mm512_fmadd_ps(zero, _mm512_set1_ps(x.scaled_sums[r * blocks + b]), sums[i][r]);
      }
    }
  }
  for (int i = 0; i < T; ++i)
    for (int r = 0; r < R; ++r) store_bf16(out + r * out_stride + i * COLUMNS, sums[i][r]);
}

// Slice `part` of `parts` of the cache lines in [bytes, bytes + size), asked for ahead of use.
inline void prefetch_slice(const uint8_t* bytes, int64_t size, int64_t part, int64_t parts) {
  const int64_t lines = (size + 63) / 64;
  for (int64_t line = lines * part / parts; line < lines * (part + 1) / parts; ++line)
    __builtin_prefetch(bytes + line * 64);
}

// ---- int8 weights (one scale per column) x int8 activations (W8A8) -----------------------------------------------
//
// The weights' codes are stored offset by 128 (vpdpbusd's unsigned operand); each block's int32 dot starts from
// -128 * (sum of the row's codes in the block), so it ends exact. With one weight scale per column, a block needs
// only float(dot) * x scale added to the sums (2 float operations per 8 dot products, against W4A8's 4); the column
// scale multiplies once at the end.
template <int T, int R>
void w8a8_pass(const uint8_t* const* tiles, const QuantizedRows::From& x, int64_t k_len,
               const float* const* w_scales, c10::BFloat16* out, int64_t out_stride) {
  const int64_t blocks = k_len / ACT_BLOCK;
  __m512 sums[T][R];
  for (int i = 0; i < T; ++i)
    for (int r = 0; r < R; ++r) sums[i][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i dots[T][R];
    for (int r = 0; r < R; ++r) {
      const __m512i start = _mm512_set1_epi32(-128 * x.sums[r * blocks + b]);
      for (int i = 0; i < T; ++i) dots[i][r] = start;
    }
    block_dots([&](int i, int64_t q) { return _mm512_loadu_si512(tiles[i] + q * 64); }, x.codes, k_len, b, dots);
    for (int r = 0; r < R; ++r) {
      const __m512 x_scale = _mm512_set1_ps(x.scales[r * blocks + b]);
      for (int i = 0; i < T; ++i) sums[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[i][r]), x_scale, sums[i][r]);
    }
  }
  for (int i = 0; i < T; ++i) {
    const __m512 scale = _mm512_loadu_ps(w_scales[i]);
    for (int r = 0; r < R; ++r) store_bf16(out + r * out_stride + i * COLUMNS, _mm512_mul_ps(sums[i][r], scale));
  }
}
#endif

void int4_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
               int64_t group_size, at::Tensor out) {
  check_common(x, packed, out, 4);
  const int64_t rows = x.size(0), k_len = x.size(1), tiles = packed.size(0);
  TORCH_CHECK(group_size > 0 && group_size % 4 == 0 && k_len % group_size == 0, "group size must divide K, by 4s");
  const int64_t groups = k_len / group_size;
  check_group_params(scales, zeros, tiles, groups);
#if defined(__AVX512BF16__)
  const auto* x_data = x.data_ptr<c10::BFloat16>();
  const auto* codes = packed.data_ptr<uint8_t>();
  const float* scale_data = scales.data_ptr<float>();
  const float* zero_data = zeros.data_ptr<float>();
  auto* out_data = out.data_ptr<c10::BFloat16>();
  // Each row's sum over each group, for the zero points: float32, 16 lanes over the group's whole vectors, then the
  // lanes and the rest in k order. Vectorized: one add at a time, before the threads start, it was a fifth of the
  // call at 60 rows.
  std::vector<float> x_sums(rows * groups);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const c10::BFloat16* group = x_data + r * k_len + g * group_size;
      __m512 lanes = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= group_size; k += 16) lanes = _mm512_add_ps(lanes, tandem::load16(group + k));
      float sum = _mm512_reduce_add_ps(lanes);
      for (; k < group_size; ++k) sum += static_cast<float>(group[k]);
      x_sums[r * groups + g] = sum;
    }
  // bf16 bits of code - 8 for codes 0..15: vpermw turns each 16-bit code into its bf16 value.
  alignas(64) uint16_t table_bits[32];
  for (int code = 0; code < 32; ++code) table_bits[code] = c10::BFloat16(static_cast<float>(code % 16 - 8)).x;
  const __m512i table = _mm512_load_si512(table_bits);
  const __m512i low_nibble = _mm512_set1_epi16(0x0F);
  const int64_t quads = k_len / 4;
  // A quad's 32 bytes: its first pair (k = 4q, 4q + 1) in the low nibbles, its second (4q + 2, 4q + 3) in the high.
  auto unpack_quad = [&](int64_t t, int64_t q, __m512bh* pairs) {
    const uint8_t* bytes = codes + (t * quads + q) * 32;
    const __m512i wide = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
    pairs[0] = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(_mm512_and_si512(wide, low_nibble), table));
    pairs[1] = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(_mm512_srli_epi16(wide, 4), table));
  };
  auto finish = [&](int64_t t, int64_t g, int64_t row, __m512 partial, __m512 sums) {
    sums = _mm512_fmadd_ps(partial, _mm512_loadu_ps(scale_data + (t * groups + g) * COLUMNS), sums);
    const __m512 row_sum = _mm512_set1_ps(x_sums[row * groups + g]);
    return _mm512_fmadd_ps(row_sum, _mm512_loadu_ps(zero_data + (t * groups + g) * COLUMNS), sums);
  };
  gemm_tiles<2>(tiles, x_data, rows, k_len, groups, out_data, unpack_quad, finish);
#endif
}

void int8_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, at::Tensor out) {
  check_common(x, packed, out, 2);
  const int64_t rows = x.size(0), k_len = x.size(1), tiles = packed.size(0);
  check_row_scales(scales, tiles);
#if defined(__AVX512BF16__)
  const auto* x_data = x.data_ptr<c10::BFloat16>();
  const auto* codes = packed.data_ptr<int8_t>();
  const float* scale_data = scales.data_ptr<float>();
  auto* out_data = out.data_ptr<c10::BFloat16>();
  const int64_t pairs = k_len / 2;
  auto unpack_pair = [&](int64_t t, int64_t p, __m512bh* pair) {  // codes are small integers: exact in bf16
    const int8_t* bytes = codes + (t * pairs + p) * 32;
    const __m512i wide = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
    const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(wide)));
    const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(wide, 1)));
    pair[0] = _mm512_cvtne2ps_pbh(high, low);
  };
  auto finish = [&](int64_t t, int64_t, int64_t, __m512 partial, __m512) {  // one group: all of K
    return _mm512_mul_ps(partial, _mm512_loadu_ps(scale_data + t * COLUMNS));
  };
  gemm_tiles<1>(tiles, x_data, rows, k_len, 1, out_data, unpack_pair, finish);
#endif
}

void w4a8_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
               int64_t group_size, at::Tensor out) {
  check_common(x, packed, out, 4);
  TORCH_CHECK(w4a8_supported(), "the int4 x int8 gemm needs AVX512-VNNI and AVX512-BF16 (this build lacks them)");
  const int64_t rows = x.size(0), k_len = x.size(1), tiles = packed.size(0);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && k_len % group_size == 0, "group size must divide K, by 32s");
  const int64_t groups = k_len / group_size;
  check_group_params(scales, zeros, tiles, groups);
#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
  const int64_t quads = k_len / 4, group_blocks = group_size / ACT_BLOCK;
  const QuantizedRows quantized(x);
  const auto* weight_codes = packed.data_ptr<uint8_t>();
  const float* scale_data = scales.data_ptr<float>();
  const float* zero_data = zeros.data_ptr<float>();
  auto* out_data = out.data_ptr<c10::BFloat16>();
  const int64_t out_stride = tiles * COLUMNS;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    // Up to W8_ROWS rows (decoding: weight bytes are the cost), each quad is unpacked in registers and used at once;
    // more rows, the tiles are unpacked once into panels and read by W8_ROWS rows at a time. Integer dots are exact
    // and the float steps the same, so both give a row the same bits.
    const bool panel = rows > W8_ROWS;
    std::vector<__m512i> scratch(panel ? W8_TILES * quads : 0);
    // Registers: one tile at a time, its bytes read in order (two tiles at once were 8 % slower at 1-4 rows, whole
    // steps, where the weights stream from memory).
    const int64_t tiles_per_pass = panel ? W8_TILES : 1;
    for (int64_t t = begin; t < end; t += tiles_per_pass) {
      const int64_t count = std::min<int64_t>(tiles_per_pass, end - t);
      const float* w_scales[W8_TILES];
      const float* w_zeros[W8_TILES];
      for (int64_t i = 0; i < count; ++i) {
        if (panel)
          for (int64_t q = 0; q < quads; ++q)
            scratch[i * quads + q] = unsigned_quad(weight_codes + ((t + i) * quads + q) * 32);
        w_scales[i] = scale_data + (t + i) * groups * COLUMNS;
        w_zeros[i] = zero_data + (t + i) * groups * COLUMNS;
      }
      const auto quad = [&](int i, int64_t q) {
        return panel ? scratch[i * quads + q] : unsigned_quad(weight_codes + ((t + i) * quads + q) * 32);
      };
      row_passes(rows, [&](auto n, int64_t r0) {
        constexpr int R = decltype(n)::value;
        c10::BFloat16* row_out = out_data + r0 * out_stride + t * COLUMNS;
        if (count == W8_TILES)
          w4a8_pass<W8_TILES, R>(quad, quantized.rows(r0), k_len, group_blocks, w_scales, w_zeros, row_out,
                                 out_stride);
        else
          w4a8_pass<1, R>(quad, quantized.rows(r0), k_len, group_blocks, w_scales, w_zeros, row_out, out_stride);
      });
    }
  });
#endif
}

void w8a8_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, at::Tensor out) {
  TORCH_CHECK(w4a8_supported(), "the int8 x int8 gemm needs AVX512-VNNI and AVX512-BF16 (this build lacks them)");
  check_common(x, packed, out, 4, 64);
  TORCH_CHECK(packed.scalar_type() == at::kByte && x.size(1) % 32 == 0,
              "packed weight must be uint8 and K whole blocks of 32");
  const int64_t rows = x.size(0), k_len = x.size(1), tiles = packed.size(0);
  check_row_scales(scales, tiles);
#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
  const int64_t quads = k_len / 4;
  const QuantizedRows quantized(x);
  const auto* weight_codes = packed.data_ptr<uint8_t>();
  const float* scale_data = scales.data_ptr<float>();
  auto* out_data = out.data_ptr<c10::BFloat16>();
  const int64_t out_stride = tiles * COLUMNS;
  const int64_t pairs = (tiles + W8_TILES - 1) / W8_TILES;
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t t = p * W8_TILES, count = std::min<int64_t>(W8_TILES, tiles - t);
      const uint8_t* tile_codes[W8_TILES];
      const float* w_scales[W8_TILES];
      for (int64_t i = 0; i < count; ++i) {
        tile_codes[i] = weight_codes + (t + i) * quads * 64;
        w_scales[i] = scale_data + (t + i) * COLUMNS;
      }
      // The next pair's bytes are asked for a slice per pass of rows, so they arrive while these are multiplied.
      const int64_t passes = (rows + W8_ROWS - 1) / W8_ROWS;
      const int64_t next_bytes = p + 1 < end ? std::min<int64_t>(W8_TILES, tiles - t - W8_TILES) * quads * 64 : 0;
      row_passes(rows, [&](auto n, int64_t r0) {
        constexpr int R = decltype(n)::value;
        prefetch_slice(weight_codes + (t + W8_TILES) * quads * 64, next_bytes, r0 / W8_ROWS, passes);
        c10::BFloat16* row_out = out_data + r0 * out_stride + t * COLUMNS;
        if (count == W8_TILES)
          w8a8_pass<W8_TILES, R>(tile_codes, quantized.rows(r0), k_len, w_scales, row_out, out_stride);
        else
          w8a8_pass<1, R>(tile_codes, quantized.rows(r0), k_len, w_scales, row_out, out_stride);
      });
    }
  });
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem, m) {
  m.def("quant_gemm_supported() -> bool", quant_gemm_supported);
  m.def("int4_gemm(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group_size, Tensor(a!) out) -> ()");
  m.def("int8_gemm(Tensor x, Tensor packed, Tensor scales, Tensor(a!) out) -> ()");
  m.def("w4a8_supported() -> bool", w4a8_supported);
  m.def("w4a8_gemm(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group_size, Tensor(a!) out) -> ()");
  m.def("w8a8_gemm(Tensor x, Tensor packed, Tensor scales, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(tandem, CPU, m) {
  m.impl("int4_gemm", int4_gemm);
  m.impl("int8_gemm", int8_gemm);
  m.impl("w4a8_gemm", w4a8_gemm);
  m.impl("w8a8_gemm", w8a8_gemm);
}
