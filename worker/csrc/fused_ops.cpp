// A decoder layer's small per-token steps, each in one pass (worker/native.py builds and loads them).
//
// Through torch ops each of these is several kernels with casts between them: a bf16 RMSNorm over 16 rows of 576
// was ~22 us of upcast, square, mean, rsqrt, products and downcast, where the arithmetic is ~1 us; writing a step's
// new K/V with index_copy_ was 4-6 % of a decode step (bench/profile_step.py). Here every step computes in float32 and
// rounds once, at the end. Each token's result depends on that token's row alone, with sums in a fixed order, so
// results stay batch invariant.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "convert.h"
#include "fast_exp.h"

namespace {

using tandem::dispatch_float_types;
using tandem::from_float;
using tandem::to_float;

constexpr int64_t ELEMENTS_PER_TASK = 16384;  // below this a thread's share is not worth waking it

int64_t grain(int64_t row_elements) { return std::max<int64_t>(1, ELEMENTS_PER_TASK / std::max<int64_t>(1, row_elements)); }

void check_rows(const at::Tensor& x, const at::Tensor& out, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1, name, ": x must be [rows, width], rows dense");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == x.scalar_type(), name, ": out must be contiguous, x's dtype");
}

// out = x / sqrt(mean(x^2) + eps) * weight, row by row.
void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor out) {
  check_rows(x, out, "rms_norm");
  const int64_t rows = x.size(0), width = x.size(1), stride = x.stride(0);
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == width && weight.scalar_type() == x.scalar_type() &&
                  out.sizes() == x.sizes(),
              "rms_norm: weight [width] and out like x");
  dispatch_float_types(x, "rms_norm", [&](auto type) {
    using scalar_t = decltype(type);
    const scalar_t* in = x.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = in + r * stride;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < width; ++i) squares += to_float(row[i]) * to_float(row[i]);
        const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(width) + static_cast<float>(eps));
        scalar_t* out_row = o + r * width;
#pragma omp simd
        for (int64_t i = 0; i < width; ++i)
          out_row[i] = from_float<scalar_t>(to_float(row[i]) * inverse * to_float(w[i]));
      }
    });
  });
}

// out = silu(gate) * up, where each row of gate_up is the gate then the up projection (the fused matmul's output).
void silu_mul(const at::Tensor& gate_up, at::Tensor out) {
  check_rows(gate_up, out, "silu_mul");
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2, stride = gate_up.stride(0);
  TORCH_CHECK(gate_up.size(1) % 2 == 0 && out.size(0) == rows && out.size(1) == width,
              "silu_mul: gate_up [rows, 2 * width] and out [rows, width]");
  dispatch_float_types(gate_up, "silu_mul", [&](auto type) {
    using scalar_t = decltype(type);
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* gate = in + r * stride;
        const scalar_t* up = gate + width;
        scalar_t* out_row = o + r * width;
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) {
          const float g = to_float(gate[i]);
          out_row[i] = from_float<scalar_t>(g / (1.0f + tandem::exp_clamped(-g)) * to_float(up[i]));
        }
      }
    });
  });
}

// Rotary embedding of every head of each token: out = x * cos + rotate_half(x) * sin, where rotate_half's sign is
// already folded into the sin table (worker/runner.py, _rope), so rotate_half is a swap of the two halves.
void rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor out) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              "rotary: x must be [tokens, heads, head_dim], heads dense");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2, stride = x.stride(0);
  TORCH_CHECK(dim % 2 == 0 && cos.is_contiguous() && sin.is_contiguous() && cos.numel() == tokens * dim &&
                  sin.numel() == tokens * dim && cos.scalar_type() == x.scalar_type() &&
                  sin.scalar_type() == x.scalar_type(),
              "rotary: cos and sin must be contiguous [tokens, head_dim] in x's dtype");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(),
              "rotary: out must be contiguous like x");
  dispatch_float_types(x, "rotary", [&](auto type) {
    using scalar_t = decltype(type);
    const scalar_t* in = x.data_ptr<scalar_t>();
    const scalar_t* cos_table = cos.data_ptr<scalar_t>();
    const scalar_t* sin_table = sin.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, grain(heads * dim), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* c = cos_table + t * dim;
        const scalar_t* s = sin_table + t * dim;
        for (int64_t h = 0; h < heads; ++h) {
          const scalar_t* head = in + t * stride + h * dim;
          scalar_t* out_head = o + (t * heads + h) * dim;
#pragma omp simd
          for (int64_t d = 0; d < half; ++d)
            out_head[d] = from_float<scalar_t>(to_float(head[d]) * to_float(c[d]) +
                                              to_float(head[d + half]) * to_float(s[d]));
#pragma omp simd
          for (int64_t d = half; d < dim; ++d)
            out_head[d] = from_float<scalar_t>(to_float(head[d]) * to_float(c[d]) +
                                              to_float(head[d - half]) * to_float(s[d]));
        }
      }
    });
  });
}

// The step's new keys and values into their cache slots (slot = block * block_size + offset).
void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots) {
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.sizes() == v.sizes() && k.stride(2) == 1 && v.stride(2) == 1,
              "write_kv: k and v must be [tokens, kv_heads, head_dim], last dim dense");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.dim() == 4 && k_cache.size(0) == k.size(1) && k_cache.size(3) == k.size(2),
              "write_kv: caches must be contiguous [kv_heads, blocks, block_size, head_dim]");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k.scalar_type() &&
                  v_cache.scalar_type() == k.scalar_type(),
              "write_kv: k, v and the caches must share a dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == k.size(0),
              "write_kv: slots must be [tokens] int64");
  const int64_t tokens = k.size(0), heads = k.size(1), dim = k.size(2);
  const int64_t slots_per_head = k_cache.size(1) * k_cache.size(2);
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < slots_per_head, "write_kv: slot ", slot[t], " out of range");
  const int64_t bytes = dim * static_cast<int64_t>(k.element_size());
  const auto* k_in = static_cast<const char*>(k.data_ptr());
  const auto* v_in = static_cast<const char*>(v.data_ptr());
  auto* k_out = static_cast<char*>(k_cache.data_ptr());
  auto* v_out = static_cast<char*>(v_cache.data_ptr());
  const int64_t element = k.element_size();
  at::parallel_for(0, tokens * heads, grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / heads, h = item % heads, target = (h * slots_per_head + slot[t]) * bytes;
      std::memcpy(k_out + target, k_in + (t * k.stride(0) + h * k.stride(1)) * element, bytes);
      std::memcpy(v_out + target, v_in + (t * v.stride(0) + h * v.stride(1)) * element, bytes);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("silu_mul(Tensor gate_up, Tensor(a!) out) -> ()");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, Tensor(a!) out) -> ()");
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(tandem, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("silu_mul", silu_mul);
  m.impl("rotary", rotary);
  m.impl("write_kv", write_kv);
}
