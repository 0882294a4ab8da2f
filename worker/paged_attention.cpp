// Decode attention straight from the paged KV cache: one query token per sequence, its K/V read in place from the
// blocks its table names, never gathered into a copy first. CPU only; built at the worker's start by
// worker/paged_attention.py (torch.utils.cpp_extension), which falls back to the runner's matmul path without it.
//
// Each (sequence, KV head) pair is computed by one thread in a fixed order over positions, so a sequence's output
// never depends on which other sequences share the call (batch invariance).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float load(uint16_t x) {  // bf16
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float load(float x) { return x; }

inline void store(float f, uint16_t* out) {  // bf16, rounded to nearest even as torch rounds
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  bits += 0x7FFF + ((bits >> 16) & 1);
  *out = static_cast<uint16_t>(bits >> 16);
}

inline void store(float f, float* out) { *out = f; }

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMaxGroup = 16;

}  // namespace

// T: the storage type, uint16_t for bf16 or float. Computes in float32.
template <typename T>
void decode_into(const T* qp, const T* kp, const T* vp, T* op, const int64_t* tp, const int64_t* cp, int64_t batch,
                 int64_t kv_heads, int64_t group, int64_t dim, int64_t block_size, int64_t num_blocks,
                 int64_t max_blocks, float fscale) {
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    float qf[kMaxGroup][kMaxHeadDim];
    float acc[kMaxGroup][kMaxHeadDim];
    float kf[kMaxHeadDim];
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / kv_heads, h = pair % kv_heads;
      const int64_t n = cp[b];
      scores.assign(static_cast<size_t>(group * n), 0.0f);
      const T* qrow = qp + (b * kv_heads + h) * group * dim;
      for (int64_t j = 0; j < group; ++j)
        for (int64_t d = 0; d < dim; ++d) qf[j][d] = load(qrow[j * dim + d]) * fscale;
      for (int64_t t = 0; t < n; ++t) {
        const int64_t block = tp[b * max_blocks + t / block_size];
        const T* krow = kp + ((h * num_blocks + block) * block_size + t % block_size) * dim;
        for (int64_t d = 0; d < dim; ++d) kf[d] = load(krow[d]);
        for (int64_t j = 0; j < group; ++j) {
          float s = 0.0f;
          for (int64_t d = 0; d < dim; ++d) s += qf[j][d] * kf[d];
          scores[j * n + t] = s;
        }
      }
      for (int64_t j = 0; j < group; ++j) {
        float* row = scores.data() + j * n;
        float top = row[0];
        for (int64_t t = 1; t < n; ++t) top = row[t] > top ? row[t] : top;
        float total = 0.0f;
        for (int64_t t = 0; t < n; ++t) {
          row[t] = std::exp(row[t] - top);
          total += row[t];
        }
        const float inv = 1.0f / total;
        for (int64_t t = 0; t < n; ++t) row[t] *= inv;
        for (int64_t d = 0; d < dim; ++d) acc[j][d] = 0.0f;
      }
      for (int64_t t = 0; t < n; ++t) {
        const int64_t block = tp[b * max_blocks + t / block_size];
        const T* vrow = vp + ((h * num_blocks + block) * block_size + t % block_size) * dim;
        for (int64_t d = 0; d < dim; ++d) kf[d] = load(vrow[d]);
        for (int64_t j = 0; j < group; ++j) {
          const float p = scores[j * n + t];
          for (int64_t d = 0; d < dim; ++d) acc[j][d] += p * kf[d];
        }
      }
      T* orow = op + (b * kv_heads + h) * group * dim;
      for (int64_t j = 0; j < group; ++j)
        for (int64_t d = 0; d < dim; ++d) store(acc[j][d], orow + j * dim + d);
    }
  });
}

// q [B, KVH, G, D]; k_blocks, v_blocks [KVH * NB, BS, D] (head-major: row h * NB + block), all bf16 or all float32;
// tables [B, MB] int64 block ids; contexts [B] int64 positions to attend to. Returns [B, KVH, G, D], q's dtype.
torch::Tensor decode(torch::Tensor q, torch::Tensor k_blocks, torch::Tensor v_blocks, torch::Tensor tables,
                     torch::Tensor contexts, double scale) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == torch::kBFloat16 || dtype == torch::kFloat32, "bf16 or float32 only");
  TORCH_CHECK(k_blocks.scalar_type() == dtype && v_blocks.scalar_type() == dtype, "q, K and V differ in dtype");
  TORCH_CHECK(tables.scalar_type() == torch::kInt64 && contexts.scalar_type() == torch::kInt64, "int64 indices");
  TORCH_CHECK(q.is_contiguous() && k_blocks.is_contiguous() && v_blocks.is_contiguous() && tables.is_contiguous() &&
              contexts.is_contiguous(), "contiguous tensors only");
  const int64_t batch = q.size(0), kv_heads = q.size(1), group = q.size(2), dim = q.size(3);
  const int64_t block_size = k_blocks.size(1), num_blocks = k_blocks.size(0) / kv_heads, max_blocks = tables.size(1);
  TORCH_CHECK(dim <= kMaxHeadDim && group <= kMaxGroup, "head_dim or group too large");
  TORCH_CHECK(tables.size(0) == batch && contexts.size(0) == batch, "one table and context per sequence");
  // Checked here, before any thread reads the cache: every position attended to lies in a valid block.
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* cp = contexts.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(cp[b] > 0 && cp[b] <= max_blocks * block_size, "context outside the block table");
    for (int64_t i = 0; i < (cp[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(tp[b * max_blocks + i] >= 0 && tp[b * max_blocks + i] < num_blocks, "block id out of range");
  }
  auto out = torch::empty_like(q);
  const float fscale = static_cast<float>(scale);
  if (dtype == torch::kFloat32) {
    decode_into<float>(q.data_ptr<float>(), k_blocks.data_ptr<float>(), v_blocks.data_ptr<float>(),
                       out.data_ptr<float>(), tables.data_ptr<int64_t>(), contexts.data_ptr<int64_t>(), batch,
                       kv_heads, group, dim, block_size, num_blocks, max_blocks, fscale);
  } else {
    auto bits = [](const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
    decode_into<uint16_t>(bits(q), bits(k_blocks), bits(v_blocks), bits(out), tables.data_ptr<int64_t>(),
                          contexts.data_ptr<int64_t>(), batch, kv_heads, group, dim, block_size, num_blocks,
                          max_blocks, fscale);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("decode", &decode, "paged decode attention (CPU, bf16)"); }
