// Decode attention over a paged KV cache, float32: one query per row, each row attending the keys of
// its own blocks where its mask is true (causal end, sliding window, padding), with Gemma 2's logit
// soft-cap when one is given, grouped-query heads reading their KV head in place.
//
// What it replaces: torch's gather of every row's blocks (two index_select copies), the permutes, and
// SDPA with a boolean mask (~70 us a call for one 256-wide head of 100 keys here): ~240 us per layer
// and token, more than the layer's matmuls at batch 1. Here a (row, head) reads its keys straight from
// the cache and keeps only its scores: [L] floats.
//
//   s_j = q . k_j * scale              (soft-capped: tanh(s_j / cap) * cap, in that order)
//   out = sum_j softmax(s)_j v_j       over the j the mask keeps; max-subtracted, in float32

#include "kernels.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

__attribute__((target_clones("avx2", "default")))
float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

__attribute__((target_clones("avx2", "default")))
void axpy(float* y, float a, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace

// q [R, H, D]; caches [blocks, bs, KVH, D]; blocks [R * n] int64 (each row's n blocks); mask [R, n * bs]
// bool; softcap <= 0: none. Returns [R, H * D].
torch::Tensor decode_attention(const torch::Tensor& q_in, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& blocks_in, const torch::Tensor& mask_in, double scale,
                               double softcap) {
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q_in.dtype() == torch::kFloat && k_cache.dtype() == torch::kFloat && v_cache.dtype() == torch::kFloat,
              "decode_attention takes float32");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
  const torch::Tensor q = q_in.contiguous();
  const torch::Tensor blocks = blocks_in.to(torch::kLong).contiguous();
  const torch::Tensor mask = mask_in.to(torch::kBool).contiguous();
  const int64_t R = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t nb = k_cache.size(0), bs = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && H % KVH == 0, "q and the caches disagree on heads");
  TORCH_CHECK(R == 0 || blocks.numel() % R == 0, "blocks must hold the same number per row");
  const int64_t n = R ? blocks.numel() / R : 0, L = n * bs;
  TORCH_CHECK(mask.numel() == R * L, "mask must be [R, blocks per row * block size]");
  const int64_t* bp = blocks.data_ptr<int64_t>();
  for (int64_t i = 0; i < blocks.numel(); ++i) TORCH_CHECK(bp[i] >= 0 && bp[i] < nb, "block id out of range");
  torch::Tensor out = torch::zeros({R, H * D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t G = H / KVH;
  const float fscale = static_cast<float>(scale), cap = static_cast<float>(softcap);
  at::parallel_for(0, R * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(L);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / H, h = item % H, kvh = h / G;
      const float* qv = qp + (r * H + h) * D;
      const bool* mr = mp + r * L;
      float best = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < L; ++j) {
        if (!mr[j]) continue;
        const int64_t slot = bp[r * n + j / bs] * bs + j % bs;
        float s = dot(qv, kp + (slot * KVH + kvh) * D, D) * fscale;
        if (cap > 0.f) s = std::tanh(s / cap) * cap;
        scores[j] = s;
        best = std::max(best, s);
      }
      if (best == -std::numeric_limits<float>::infinity()) continue;   // nothing to attend: zeros
      float total = 0.f;
      for (int64_t j = 0; j < L; ++j) {
        if (!mr[j]) continue;
        scores[j] = std::exp(scores[j] - best);
        total += scores[j];
      }
      float* o = op + r * H * D + h * D;
      for (int64_t j = 0; j < L; ++j) {
        if (!mr[j]) continue;
        const int64_t slot = bp[r * n + j / bs] * bs + j % bs;
        axpy(o, scores[j] / total, vp + (slot * KVH + kvh) * D, D);
      }
    }
  });
  return out;
}
