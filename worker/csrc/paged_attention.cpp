// Attention that reads the paged KV cache in place, for every row of a step: decode rows and prompt rows alike, each
// a query attending to the first `length` positions of its sequence (worker/native.py builds and loads it).
//
// The torch path (worker/runner.py, _decode_attention) first gathers every sequence's blocks into one contiguous
// copy, pads the query group to a matrix, and runs two bf16 matmuls around a float32 softmax: on a 64-sequence step
// the gather alone was 16-19 % of the step and the whole attention 35-40 % (bench/profile_step.py). Here each
// (row, KV head) pair computes its query heads' scores, softmax and weighted sum of V, read straight from the blocks
// of its table: in float32, or for bf16 caches on AVX512-BF16 with bf16 dot products (vdpbf16ps) summed in float32,
// the probabilities rounded to bf16 for the weighted sum (Avx512::BF16_DOTS). A row's result depends only on its own
// query, blocks and length, and the order of every sum is fixed at compile time: a row gets the same bits whatever
// its batch neighbours are, and a prompt token the same as if it were decoded. Prompt chunks' rows run this way too since it beat the torch prefill
// path (gather, masked bf16 matmuls) by 8-11 % a whole step at contexts below ~2,500 tokens, and at 6,000 a 256-token
// chunk was 6 % slower with fp32 dot products; on bf16 ones that chunk's step runs 1.4x faster than it did (445 -> 316
// ms, Q4_1; 2,000 tokens: 172 -> 126; bench/step.py --prefill 256 --prefill-at 6000).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "convert.h"
#include "fast_exp.h"
#include "lanes.h"

namespace {

// The two ways to do a tile of up to TILE keys (or values) of one block: portable C++ the compiler vectorizes, and
// AVX-512 intrinsics for head sizes of whole vectors. The portable dot product ends each key with a horizontal sum
// the compiler writes as 16 serial adds; the AVX-512 one sums 16 keys' lanes at once (sum_lanes_of_16) and keeps the
// value sums in registers: 3-4x faster on Zen 5.
constexpr int64_t TILE = 16;
constexpr int64_t MAX_HEAD_DIM = 512;  // the portable tile's scratch row

template <typename scalar_t>
struct Portable {
  using query_t = float;  // how the queries are held (the query as it is, in float32)

  // scores[g * stride + i] = scale * queries[g] . keys[i] for the tile's `rows` keys.
  static void scores(const float* queries, int64_t group, int dim, const scalar_t* keys, int rows, float scale,
                     float* scores, int64_t stride) {
    float key[MAX_HEAD_DIM];
    for (int i = 0; i < rows; ++i) {
#pragma omp simd
      for (int d = 0; d < dim; ++d) key[d] = static_cast<float>(keys[i * dim + d]);
      for (int64_t g = 0; g < group; ++g) {
        const float* q = queries + g * dim;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int d = 0; d < dim; ++d) dot += q[d] * key[d];
        scores[g * stride + i] = dot * scale;
      }
    }
  }
  // One head's output from its sums (held in dimension order here).
  static void output(const float* sums, int dim, scalar_t* out) {
    for (int d = 0; d < dim; ++d) out[d] = static_cast<scalar_t>(sums[d]);
  }

  // sums[g] += probs[g * stride + i] * values[i] over the tile's `rows` values.
  static void values(const float* probs, int64_t stride, int64_t group, int dim, const scalar_t* values, int rows,
                     float* sums) {
    float value[MAX_HEAD_DIM];
    for (int i = 0; i < rows; ++i) {
#pragma omp simd
      for (int d = 0; d < dim; ++d) value[d] = static_cast<float>(values[i * dim + d]);
      for (int64_t g = 0; g < group; ++g) {
        const float p = probs[g * stride + i];
        float* sum = sums + g * dim;
#pragma omp simd
        for (int d = 0; d < dim; ++d) sum[d] += p * value[d];
      }
    }
  }
};

#if defined(__AVX512F__)
using tandem::load16;

using tandem::sum_lanes_of_16;

#if defined(__AVX512BF16__)
inline __m512bh load_bf16x32(const c10::BFloat16* from) {
  return reinterpret_cast<__m512bh>(_mm512_loadu_si512(from));
}
#endif

template <typename scalar_t, int DIM>
struct Avx512 {
  static constexpr int VECTORS = DIM / 16;                       // per head
  static constexpr int HEADS = VECTORS >= 16 ? 1 : 16 / VECTORS;  // query heads per pass, in 16 registers

  // Calls pass(std::integral_constant<int, N>) with N = n, for n in [1, HEADS]: every pass's head count is a
  // compile-time constant, so its registers are allocated exactly (a padded head cost a quarter of the FMAs at 3).
  template <int N = HEADS, typename Pass>
  static void with_heads(int64_t n, Pass&& pass) {
    if constexpr (N >= 1) {
      if (n == N) return pass(std::integral_constant<int, N>{});
      with_heads<N - 1>(n, pass);
    }
  }

  // bf16 caches on a CPU with AVX512-BF16: queries stay bf16 and scores run on vdpbf16ps, 32 products an
  // instruction straight from the keys' bits (float32 ones took a conversion and 16 an instruction), one head at a
  // time (all of a pass's heads at once held 48 vectors of dots: spilled to the stack); the weighted values too
  // (values()). With the vector softmax below, the attention of 60 decodes beside a 256-token chunk ran 1.5x
  // faster (478 -> 320 us a layer, 9 heads of 64), whole steps 1.05-1.09x.
  static constexpr bool BF16_DOTS =
#if defined(__AVX512BF16__)
      std::is_same_v<scalar_t, c10::BFloat16>;
#else
      false;
#endif
  using query_t = std::conditional_t<BF16_DOTS, c10::BFloat16, float>;

  static void scores(const query_t* queries, int64_t group, int, const scalar_t* keys, int rows, float scale,
                     float* scores, int64_t stride) {
#if defined(__AVX512BF16__)
    if constexpr (BF16_DOTS) {
      constexpr int PAIRS = DIM / 32;  // vectors of 32 bf16 per head
      for (int64_t g = 0; g < group; ++g) {
        __m512bh q[PAIRS];
        for (int c = 0; c < PAIRS; ++c) q[c] = load_bf16x32(queries + g * DIM + c * 32);
        __m512 dots[TILE];
        for (int i = 0; i < TILE; ++i) {
          dots[i] = _mm512_setzero_ps();
          if (i < rows)
            for (int c = 0; c < PAIRS; ++c)
              dots[i] = _mm512_dpbf16_ps(dots[i], q[c], load_bf16x32(keys + i * DIM + c * 32));
        }
        _mm512_storeu_ps(scores + g * stride, _mm512_mul_ps(sum_lanes_of_16(dots), _mm512_set1_ps(scale)));
      }
      return;
    }
#endif
    if constexpr (!BF16_DOTS) float_scores(queries, group, keys, rows, scale, scores, stride);
  }

  static void float_scores(const float* queries, int64_t group, const scalar_t* keys, int rows, float scale,
                           float* scores, int64_t stride) {
    for (int64_t g0 = 0; g0 < group; g0 += HEADS) {
      with_heads(std::min<int64_t>(HEADS, group - g0), [&](auto heads) {
        constexpr int N = decltype(heads)::value;
        __m512 q[N][VECTORS], dots[N][TILE];
        for (int g = 0; g < N; ++g)
          for (int c = 0; c < VECTORS; ++c) q[g][c] = _mm512_loadu_ps(queries + (g0 + g) * DIM + c * 16);
        for (int i = 0; i < TILE; ++i) {
          __m512 key[VECTORS];
          for (int c = 0; c < VECTORS; ++c) key[c] = i < rows ? load16(keys + i * DIM + c * 16) : _mm512_setzero_ps();
          for (int g = 0; g < N; ++g) {
            __m512 dot = _mm512_mul_ps(q[g][0], key[0]);
            for (int c = 1; c < VECTORS; ++c) dot = _mm512_fmadd_ps(q[g][c], key[c], dot);
            dots[g][i] = dot;
          }
        }
        for (int g = 0; g < N; ++g)
          _mm512_storeu_ps(scores + (g0 + g) * stride, _mm512_mul_ps(sum_lanes_of_16(dots[g]), _mm512_set1_ps(scale)));
      });
    }
  }

  // With BF16_DOTS the weighted values run on vdpbf16ps too, two keys per instruction: lane l sums p_i v_i[d] +
  // p_i+1 v_i+1[d], the probabilities rounded to bf16 (as flash attention does before its P V product), the values
  // interleaved key by key (vpunpck[lh]wd, within 128-bit lanes). The sums are then held in that order: per 32
  // dimensions, d = 0-3, 8-11, 16-19, 24-27, then 4-7, 12-15, ...; output() puts them back.
  static void output(const float* sums, int, scalar_t* out) {
    if constexpr (BF16_DOTS) {
      // Dimension d of a chunk of 32: lane (d / 8) * 4 + d % 4 of the first vector (d % 8 < 4) or of the second.
      alignas(64) int32_t order[32];
      for (int d = 0; d < 32; ++d) order[d] = (d % 8 < 4 ? 0 : 16) + (d / 8) * 4 + d % 4;
      const __m512i first = _mm512_load_si512(order), second = _mm512_load_si512(order + 16);
      for (int c = 0; c < DIM / 32; ++c) {
        const __m512 low = _mm512_loadu_ps(sums + c * 32), high = _mm512_loadu_ps(sums + c * 32 + 16);
        const __m512 dims[2] = {_mm512_permutex2var_ps(low, first, high), _mm512_permutex2var_ps(low, second, high)};
        for (int h = 0; h < 2; ++h)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c * 32 + h * 16),
                              reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(dims[h])));
      }
      return;
    }
    for (int d = 0; d < DIM; ++d) out[d] = static_cast<scalar_t>(sums[d]);
  }

  static void values(const float* probs, int64_t stride, int64_t group, int, const scalar_t* values, int rows,
                     float* sums) {
#if defined(__AVX512BF16__)
    if constexpr (BF16_DOTS) {
      constexpr int CHUNKS = DIM / 32;
      for (int64_t g0 = 0; g0 < group; g0 += HEADS) {
        with_heads(std::min<int64_t>(HEADS, group - g0), [&](auto heads) {
          constexpr int N = decltype(heads)::value;
          __m512 sum[N][VECTORS];
          // Each head's probabilities in bf16, two to a 32-bit lane: lane j holds keys 2j and 2j + 1. The tile's
          // scores were written as a whole vector of 16, zero past the context, so an odd last key pairs with 0.
          alignas(64) int32_t prob_pairs[N][TILE / 2];
          for (int g = 0; g < N; ++g) {
            const __m512 p = _mm512_loadu_ps(probs + (g0 + g) * stride);
            _mm256_store_si256(reinterpret_cast<__m256i*>(prob_pairs[g]),
                               reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(p)));
          }
          for (int g = 0; g < N; ++g)
            for (int c = 0; c < VECTORS; ++c) sum[g][c] = _mm512_loadu_ps(sums + (g0 + g) * DIM + c * 16);
          for (int i = 0; i < rows; i += 2) {
            const bool second = i + 1 < rows;  // an odd last key pairs with zeros
            __m512bh pairs[VECTORS];
            for (int c = 0; c < CHUNKS; ++c) {
              const __m512i a = _mm512_loadu_si512(values + i * DIM + c * 32);
              const __m512i b = second ? _mm512_loadu_si512(values + (i + 1) * DIM + c * 32) : _mm512_setzero_si512();
              pairs[2 * c] = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(a, b));
              pairs[2 * c + 1] = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(a, b));
            }
            for (int g = 0; g < N; ++g) {
              const __m512bh p2 = reinterpret_cast<__m512bh>(_mm512_set1_epi32(prob_pairs[g][i / 2]));
              for (int c = 0; c < VECTORS; ++c) sum[g][c] = _mm512_dpbf16_ps(sum[g][c], pairs[c], p2);
            }
          }
          for (int g = 0; g < N; ++g)
            for (int c = 0; c < VECTORS; ++c) _mm512_storeu_ps(sums + (g0 + g) * DIM + c * 16, sum[g][c]);
        });
      }
      return;
    }
#endif
    for (int64_t g0 = 0; g0 < group; g0 += HEADS) {
      with_heads(std::min<int64_t>(HEADS, group - g0), [&](auto heads) {
        constexpr int N = decltype(heads)::value;
        __m512 sum[N][VECTORS];
        for (int g = 0; g < N; ++g)
          for (int c = 0; c < VECTORS; ++c) sum[g][c] = _mm512_loadu_ps(sums + (g0 + g) * DIM + c * 16);
        for (int i = 0; i < rows; ++i) {
          __m512 value[VECTORS];
          for (int c = 0; c < VECTORS; ++c) value[c] = load16(values + i * DIM + c * 16);
          for (int g = 0; g < N; ++g) {
            const __m512 p = _mm512_set1_ps(probs[(g0 + g) * stride + i]);
            for (int c = 0; c < VECTORS; ++c) sum[g][c] = _mm512_fmadd_ps(p, value[c], sum[g][c]);
          }
        }
        for (int g = 0; g < N; ++g)
          for (int c = 0; c < VECTORS; ++c) _mm512_storeu_ps(sums + (g0 + g) * DIM + c * 16, sum[g][c]);
      });
    }
  }
};
#endif

// Asks for the next block of keys or values while this one is summed: blocks lie anywhere in the cache, so the
// hardware prefetcher, which follows addresses, only catches up after each block's first misses.
inline void prefetch_block(const void* block, int64_t bytes) {
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(static_cast<const char*>(block) + offset);
}

// Softmax over a row's `length` scores, in float32, in place. With AVX-512: whole vectors, the last one masked and
// stored whole (zeros past `length`: a row has room for a tile past its context, and the bf16 values pair an odd
// last key's probability with the zero after it); the loops left to the compiler ran their tails one lane at a time.
inline void softmax(float* row, int64_t length) {
#if defined(__AVX512F__)
  const int64_t whole = length / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (length - whole)) - 1);
  __m512 peaks = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < whole; t += 16) peaks = _mm512_max_ps(peaks, _mm512_loadu_ps(row + t));
  peaks = _mm512_mask_max_ps(peaks, tail, peaks, _mm512_maskz_loadu_ps(tail, row + whole));
  const __m512 peak = _mm512_set1_ps(_mm512_reduce_max_ps(peaks));
  __m512 totals = _mm512_setzero_ps();
  for (int64_t t = 0; t < whole; t += 16) {
    const __m512 e = tandem::exp16_clamped(_mm512_sub_ps(_mm512_loadu_ps(row + t), peak));
    _mm512_storeu_ps(row + t, e);
    totals = _mm512_add_ps(totals, e);
  }
  if (tail) {
    const __m512 e =
        _mm512_maskz_mov_ps(tail, tandem::exp16_clamped(_mm512_sub_ps(_mm512_loadu_ps(row + whole), peak)));
    _mm512_storeu_ps(row + whole, e);
    totals = _mm512_add_ps(totals, e);
  }
  const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(totals));
  for (int64_t t = 0; t < whole + (tail ? 16 : 0); t += 16)
    _mm512_storeu_ps(row + t, _mm512_mul_ps(_mm512_loadu_ps(row + t), inverse));
#else
  float peak = -INFINITY;
#pragma omp simd reduction(max : peak)
  for (int64_t t = 0; t < length; ++t) peak = row[t] > peak ? row[t] : peak;
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t t = 0; t < length; ++t) {
    row[t] = tandem::exp_clamped(row[t] - peak);
    total += row[t];
  }
  const float inverse = 1.0f / total;
#pragma omp simd
  for (int64_t t = 0; t < length; ++t) row[t] *= inverse;
#endif
}

// Rows of one sequence (a prompt chunk's) are taken together, up to this many: each tile of keys or values is then
// read from memory once for all of them and from L1 for the rest. One row at a time, a 256-token chunk at 6,000
// tokens of context read each head's K and V from L3 once per row, and its step was 1.26x the torch path's.
constexpr int64_t MAX_RUN = 8;
constexpr int64_t RUN_SCORE_BYTES = 256 * 1024;  // a run's float32 scores stay about the size of L2

// Consecutive rows with the same block table, in runs of up to MAX_RUN (fewer where their scores would outgrow
// RUN_SCORE_BYTES): [first row, row count] pairs.
std::vector<std::pair<int64_t, int64_t>> runs_of_rows(const int64_t* tables, const int64_t* lens, int64_t batch,
                                                      int64_t table_len, int64_t group) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t row = 0; row < batch; ++row) {
    if (!runs.empty()) {
      auto& [first, count] = runs.back();
      const int64_t longest = std::max(lens[first], lens[row]) + TILE;
      const int64_t limit = std::clamp<int64_t>(RUN_SCORE_BYTES / (4 * group * longest), 1, MAX_RUN);
      const bool same_table =
          std::memcmp(tables + first * table_len, tables + row * table_len, table_len * sizeof(int64_t)) == 0;
      if (same_table && count < limit) {
        ++count;
        continue;
      }
    }
    runs.emplace_back(row, 1);
  }
  return runs;
}

// One work item per (run of rows, KV head): each row's query heads' scores, softmax and weighted values, tile by
// tile. Every row does exactly what it would alone (same tiles, same order of every sum), so its bits do not depend
// on the run it shares or on its batch. Tile: Portable<scalar_t> or Avx512<scalar_t, DIM>; DIM 0 means the head size
// is only known at run time.
template <typename scalar_t, typename Tile, int DIM>
void attend(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale, at::Tensor& out) {
  const int64_t batch = query.size(0), num_heads = query.size(1);
  const int64_t num_kv_heads = k_cache.size(0), num_blocks = k_cache.size(1);
  const int64_t block_size = k_cache.size(2);
  const int dim = DIM ? DIM : static_cast<int>(k_cache.size(3));
  const int64_t group = num_heads / num_kv_heads, table_len = block_tables.size(1);
  const int64_t q_row = query.stride(0), q_head = query.stride(1);
  const scalar_t* q_data = query.data_ptr<scalar_t>();
  const scalar_t* k_data = k_cache.data_ptr<scalar_t>();
  const scalar_t* v_data = v_cache.data_ptr<scalar_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  const float softmax_scale = static_cast<float>(scale);
  const int64_t block_elems = block_size * dim;
  const auto runs = runs_of_rows(tables, lens, batch, table_len, group);

  // Items are handed out one at a time, last first: a prompt chunk's rows grow in length down the batch, so even
  // halves of the items gave one thread three quarters of the work. Which thread runs an item changes none of its
  // arithmetic.
  const int64_t items = static_cast<int64_t>(runs.size()) * num_kv_heads;
  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<typename Tile::query_t> queries;
    std::vector<float> sums, scores;
    for (int64_t taken; (taken = next_item.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int64_t item = items - 1 - taken;
      const auto [first, count] = runs[item / num_kv_heads];
      const int64_t kv_head = item % num_kv_heads;
      int64_t longest = 0;
      for (int64_t r = 0; r < count; ++r) longest = std::max(longest, lens[first + r]);
      // A tile's scores are written as whole vectors, up to TILE - 1 past the context: each row has room for them.
      const int64_t row_len = longest + TILE, run_stride = group * row_len;
      const int64_t* table = tables + first * table_len;
      queries.resize(count * group * dim);
      sums.assign(count * group * dim, 0.0f);
      scores.resize(count * run_stride);
      for (int64_t r = 0; r < count; ++r)
        for (int64_t g = 0; g < group; ++g) {
          const scalar_t* q = q_data + (first + r) * q_row + (kv_head * group + g) * q_head;
          auto* held = queries.data() + (r * group + g) * dim;
          if constexpr (std::is_same_v<typename Tile::query_t, scalar_t>)
            std::memcpy(held, q, dim * sizeof(scalar_t));
          else
            for (int d = 0; d < dim; ++d) held[d] = static_cast<typename Tile::query_t>(q[d]);
        }
      // The rows' tiles: a row's tile at t ends at its own length, or at TILE, or at the block's end.
      const auto tile_rows = [&](int64_t length, int64_t t) {
        return std::min({TILE, length - t, block_size - t % block_size});
      };
      const scalar_t* k_head = k_data + kv_head * num_blocks * block_elems;
      const scalar_t* v_head = v_data + kv_head * num_blocks * block_elems;
      for (int64_t t = 0; t < longest; t += tile_rows(longest, t)) {  // tiles end at block ends too
        if (t % block_size == 0 && t + block_size < longest)
          prefetch_block(k_head + table[t / block_size + 1] * block_elems, block_elems * sizeof(scalar_t));
        const scalar_t* keys = k_head + table[t / block_size] * block_elems + (t % block_size) * dim;
        for (int64_t r = 0; r < count; ++r)
          if (t < lens[first + r])
            Tile::scores(queries.data() + r * group * dim, group, dim, keys, tile_rows(lens[first + r], t),
                         softmax_scale, scores.data() + r * run_stride + t, row_len);
      }
      for (int64_t r = 0; r < count; ++r) {
        const int64_t length = lens[first + r];
        for (int64_t g = 0; g < group; ++g) softmax(&scores[r * run_stride + g * row_len], length);
      }
      for (int64_t t = 0; t < longest; t += tile_rows(longest, t)) {
        if (t % block_size == 0 && t + block_size < longest)
          prefetch_block(v_head + table[t / block_size + 1] * block_elems, block_elems * sizeof(scalar_t));
        const scalar_t* values = v_head + table[t / block_size] * block_elems + (t % block_size) * dim;
        for (int64_t r = 0; r < count; ++r)
          if (t < lens[first + r])
            Tile::values(scores.data() + r * run_stride + t, row_len, group, dim, values,
                         tile_rows(lens[first + r], t), sums.data() + r * group * dim);
      }
      for (int64_t r = 0; r < count; ++r)
        for (int64_t g = 0; g < group; ++g) {
          scalar_t* o = out_data + ((first + r) * num_heads + kv_head * group + g) * dim;
          Tile::output(sums.data() + (r * group + g) * dim, dim, o);
        }
    }
  });
}

// The AVX-512 tiles where the head size is 64 or 128 and the CPU has them (this is built with -march=native).
template <typename scalar_t>
void run(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
         const at::Tensor& context_lens, double scale, at::Tensor& out) {
#if defined(__AVX512F__)
  if (query.size(2) == 64)
    return attend<scalar_t, Avx512<scalar_t, 64>, 64>(query, k_cache, v_cache, block_tables, context_lens, scale, out);
  if (query.size(2) == 128)
    return attend<scalar_t, Avx512<scalar_t, 128>, 128>(query, k_cache, v_cache, block_tables, context_lens, scale, out);
#endif
  attend<scalar_t, Portable<scalar_t>, 0>(query, k_cache, v_cache, block_tables, context_lens, scale, out);
}

void paged_decode_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                            at::Tensor out) {
  TORCH_CHECK(query.device().is_cpu(), "paged_decode_attention runs on CPU tensors");
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query must be [batch, heads, head_dim], last dim dense");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes(),
              "caches must be contiguous [kv_heads, blocks, block_size, head_dim]");
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type() &&
                  out.scalar_type() == query.scalar_type(),
              "query, caches and out must share a dtype");
  TORCH_CHECK(query.size(2) == k_cache.size(3) && query.size(1) % k_cache.size(0) == 0, "head counts or sizes differ");
  TORCH_CHECK(query.size(2) <= MAX_HEAD_DIM, "head_dim above ", MAX_HEAD_DIM);
  TORCH_CHECK(out.is_contiguous() && out.sizes() == query.sizes(), "out must be a contiguous tensor like query");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong &&
                  block_tables.is_contiguous() && context_lens.is_contiguous() && block_tables.dim() == 2 &&
                  block_tables.size(0) == query.size(0) && context_lens.numel() == query.size(0),
              "block_tables [batch, max_blocks] and context_lens [batch] must be contiguous int64");
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t table_len = block_tables.size(1), block_size = k_cache.size(2), num_blocks = k_cache.size(1);
  for (int64_t seq = 0; seq < query.size(0); ++seq) {  // checked here, once: the kernel reads memory by them
    TORCH_CHECK(lens[seq] > 0 && lens[seq] <= table_len * block_size, "a context length outside its block table");
    for (int64_t j = 0; j < (lens[seq] + block_size - 1) / block_size; ++j)
      TORCH_CHECK(tables[seq * table_len + j] >= 0 && tables[seq * table_len + j] < num_blocks, "a block id out of range");
  }
  tandem::dispatch_float_types(query, "paged_decode_attention", [&](auto type) {
    run<decltype(type)>(query, k_cache, v_cache, block_tables, context_lens, scale, out);
  });
}

}  // namespace

TORCH_LIBRARY(tandem, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(tandem, CPU, m) { m.impl("paged_decode_attention", paged_decode_attention); }
