// Decode attention over a paged KV cache, float32: one query per row, each row attending the keys of
// its own blocks where its mask is true (causal end, sliding window, padding), with Gemma 2's logit
// soft-cap when one is given, grouped-query heads reading their KV head in place.
//
// What it replaces: torch's gather of every row's blocks (two index_select copies), the permutes, and
// SDPA with a boolean mask (~70 us a call for one 256-wide head of 100 keys here): ~240 us per layer
// and token, more than the layer's matmuls at batch 1. Here keys are read straight from the cache.
//
//   s_j = q . k_j * scale              (soft-capped: tanh(s_j / cap) * cap, in that order)
//   out = sum_j softmax(s)_j v_j       over the j the mask keeps; max-subtracted, in float32, per chunk
//                                      of keys, the chunks merged as flash-decoding does

#include "isa.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

namespace {

// Keys per work item. Fixed, not derived from the thread count, so the partial sums, and so the
// result, are the same however many threads run.
constexpr int64_t kKeyChunk = 128;

__attribute__((target_clones("avx2", "default")))
void axpy(float* y, float a, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// The scalar inner loops (any CPU, any head size); the vector ones below have the same interface.
namespace scalar {

void qk(const float* q, int64_t G, int64_t D, const float* const* keys, int64_t cnt, float* scores, int64_t stride) {
  for (int64_t h = 0; h < G; ++h)
    for (int64_t j = 0; j < cnt; ++j) {
      float s = 0.f;
      for (int64_t i = 0; i < D; ++i) s += q[h * D + i] * keys[j][i];
      scores[h * stride + j] = s;
    }
}

void pv(float* acc, int64_t G, int64_t D, const float* const* values, const float* p, int64_t stride, int64_t cnt) {
  for (int64_t h = 0; h < G; ++h)
    for (int64_t j = 0; j < cnt; ++j) axpy(acc + h * D, p[h * stride + j], values[j], D);
}

}  // namespace scalar

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#define GEMLORA_VEC_NS avx512
#define GEMLORA_VEC_WIDTH 16
#include "attention_simd.h"
#undef GEMLORA_VEC_NS
#undef GEMLORA_VEC_WIDTH
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define GEMLORA_VEC_NS avx2
#define GEMLORA_VEC_WIDTH 8
#include "attention_simd.h"
#undef GEMLORA_VEC_NS
#undef GEMLORA_VEC_WIDTH
#pragma GCC pop_options

using QK = void (*)(const float*, int64_t, int64_t, const float* const*, int64_t, float*, int64_t);
using PV = void (*)(float*, int64_t, int64_t, const float* const*, const float*, int64_t, int64_t);

// The widest path this CPU runs for this head size ("auto"), or the one named (for the tests).
std::pair<QK, PV> inner_loops(int64_t D, const std::string& isa) {
  TORCH_CHECK(isa == "auto" || isa == "avx512" || isa == "avx2" || isa == "scalar", "unknown isa ", isa);
  __builtin_cpu_init();
  const bool avx512 = D % 16 == 0 && gemlora::isa_allowed(gemlora::Isa::kAvx512Vnni) && __builtin_cpu_supports("avx512f");
  const bool avx2 = D % 8 == 0 && gemlora::isa_allowed(gemlora::Isa::kAvx2) && __builtin_cpu_supports("avx2") &&
                    __builtin_cpu_supports("fma");
  TORCH_CHECK((isa != "avx512" || avx512) && (isa != "avx2" || avx2), "this CPU or head size cannot run ", isa);
  if (avx512 && (isa == "auto" || isa == "avx512")) return {avx512::qk, avx512::pv};
  if (avx2 && (isa == "auto" || isa == "avx2")) return {avx2::qk, avx2::pv};
  return {scalar::qk, scalar::pv};
}

}  // namespace

// q [R, H, D]; caches [blocks, bs, KVH, D]; blocks [R * n] int64 (each row's n blocks); mask [R, n * bs]
// bool; softcap <= 0: none. Returns [R, H * D].
//
// Work items are (row, KV head, chunk of kKeyChunk keys): the G query heads of a KV head read each key
// and value once (GQA: Gemma 3 270M has 4 query heads per KV head, Gemma 2B 8), and a long context
// spreads over the threads even at batch 1. Each item keeps, per query head, its chunk's running max,
// sum of exp and unnormalised output; the chunks then merge in order (flash-decoding).
torch::Tensor decode_attention(const torch::Tensor& q_in, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& blocks_in, const torch::Tensor& mask_in, double scale,
                               double softcap, const std::string& isa) {
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
  if (R == 0 || L == 0) return out;
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t G = H / KVH, chunks = (L + kKeyChunk - 1) / kKeyChunk, items = R * KVH * chunks;
  const float fscale = static_cast<float>(scale), cap = static_cast<float>(softcap);
  const float none = -std::numeric_limits<float>::infinity();
  // per item and query head: max, sum of exp, and the output before normalisation (each item sets its
  // own; with one chunk per row the item writes its normalised output straight into `out`)
  const bool direct = chunks == 1;
  std::unique_ptr<float[]> part_max(new float[items * G]), part_sum(new float[items * G]);
  std::unique_ptr<float[]> part_out(direct ? nullptr : new float[items * G * D]);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(G * D, 1));
  const auto [qk, pv] = inner_loops(D, isa);
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * kKeyChunk);
    const float* keys[kKeyChunk];
    const float* values[kKeyChunk];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item % chunks, rk = item / chunks, r = rk / KVH, kvh = rk % KVH;
      const int64_t j0 = c * kKeyChunk, j1 = std::min(L, j0 + kKeyChunk);
      const bool* mr = mp + r * L;
      float* best = part_max.get() + item * G;
      float* total = part_sum.get() + item * G;
      // direct: the G heads of this KV head are consecutive in the row's output
      float* acc = direct ? op + (r * H + kvh * G) * D : part_out.get() + item * G * D;
      std::fill(best, best + G, none);
      std::fill(total, total + G, 0.f);
      if (!direct) std::fill(acc, acc + G * D, 0.f);
      int64_t cnt = 0;                          // the chunk's keys the mask keeps, in order
      for (int64_t j = j0; j < j1; ++j) {
        if (!mr[j]) continue;
        const int64_t at = ((bp[r * n + j / bs] * bs + j % bs) * KVH + kvh) * D;
        keys[cnt] = kp + at;
        values[cnt++] = vp + at;
      }
      if (cnt == 0) continue;                   // nothing to attend in this chunk
      qk(qp + (r * H + kvh * G) * D, G, D, keys, cnt, scores.data(), kKeyChunk);
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * kKeyChunk;
        for (int64_t t = 0; t < cnt; ++t) {
          float s = sg[t] * fscale;
          if (cap > 0.f) s = std::tanh(s / cap) * cap;
          sg[t] = s;
          best[g] = std::max(best[g], s);
        }
        for (int64_t t = 0; t < cnt; ++t) {
          sg[t] = std::exp(sg[t] - best[g]);
          total[g] += sg[t];
        }
      }
      pv(acc, G, D, values, scores.data(), kKeyChunk, cnt);
      if (direct)
        for (int64_t g = 0; g < G; ++g) {
          const float inv = 1.f / total[g];
          for (int64_t i = 0; i < D; ++i) acc[g * D + i] *= inv;
        }
    }
  });
  if (direct) return out;
  // merge the chunks of each (row, head), in chunk order
  at::parallel_for(0, R * H, std::max<int64_t>(1, 4096 / std::max<int64_t>(D * chunks, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t r = rh / H, h = rh % H, kvh = h / G, g = h % G;
      const int64_t first = (r * KVH + kvh) * chunks;
      float m = none;
      for (int64_t c = 0; c < chunks; ++c) m = std::max(m, part_max.get()[(first + c) * G + g]);
      if (m == none) continue;                  // nothing to attend: zeros
      float total = 0.f;
      float* o = op + rh * D;
      for (int64_t c = 0; c < chunks; ++c) {
        const float mc = part_max.get()[(first + c) * G + g];
        if (mc == none) continue;
        const float w = std::exp(mc - m);
        total += part_sum.get()[(first + c) * G + g] * w;
        axpy(o, w, part_out.get() + ((first + c) * G + g) * D, D);
      }
      const float inv = 1.f / total;
      for (int64_t i = 0; i < D; ++i) o[i] *= inv;
    }
  });
  return out;
}
