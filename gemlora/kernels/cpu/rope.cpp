// Rotary embedding (rotate-half), with Gemma 3's per-head QK RMSNorm before it when a scale is
// given, for float32 [T, heads, D] in one call:
//
//   y = x / sqrt(mean(x^2) + eps) * scale                      (when scale is given; as rmsnorm.cpp)
//   out[i] = y[i] * cos[i] - y[i + D/2] * sin[i]              i <  D/2
//   out[i] = y[i] * cos[i] + y[i - D/2] * sin[i]              i >= D/2
//
// What it replaces: per layer and token, two norms and twelve small torch ops (slice, neg, cat, two
// muls and an add for q and again for k), ~1.5 ms of a 30 ms decode step of the 270M model. The
// products and the sum are rounded as torch's x * cos + rotated * sin rounds them (no FMA), so the
// result equals the unfused reference exactly.

#include "kernels.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

torch::Tensor norm_rope(const torch::Tensor& x, const c10::optional<torch::Tensor>& scale_in, double eps,
                        const torch::Tensor& cos_in, const torch::Tensor& sin_in) {
  TORCH_CHECK(x.dim() == 3 && x.dtype() == torch::kFloat && x.stride(2) == 1,
              "norm_rope takes float32 [T, heads, D] with contiguous rows");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK(D % 2 == 0, "the head size must be even");
  const torch::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  TORCH_CHECK(cos.dtype() == torch::kFloat && sin.dtype() == torch::kFloat && cos.numel() == T * D &&
              sin.numel() == T * D, "cos and sin must be float32 [T, D]");
  torch::Tensor scale;
  if (scale_in) {
    scale = scale_in->contiguous();
    TORCH_CHECK(scale.dtype() == torch::kFloat && scale.numel() == D, "the norm scale must be float32 [D]");
  }
  const float* sp = scale_in ? scale.data_ptr<float>() : nullptr;
  torch::Tensor out = torch::empty({T, H, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* snp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  at::parallel_for(0, T * H, std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> y(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / H, h = item % H;
      const float* xr = xp + t * s0 + h * s1;
      if (sp) {
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < D; ++i) sum += static_cast<double>(xr[i]) * xr[i];
        const float inv = static_cast<float>(1.0 / std::sqrt(sum / static_cast<double>(D) + eps));
        for (int64_t i = 0; i < D; ++i) y[i] = xr[i] * inv * sp[i];
      } else {
        for (int64_t i = 0; i < D; ++i) y[i] = xr[i];
      }
      const float* c = cp + t * D;
      const float* s = snp + t * D;
      float* o = op + item * D;
      for (int64_t i = 0; i < half; ++i) {
        const float a = y[i] * c[i], b = -y[i + half] * s[i];
        o[i] = a + b;
      }
      for (int64_t i = half; i < D; ++i) {
        const float a = y[i] * c[i], b = y[i - half] * s[i];
        o[i] = a + b;
      }
    }
  });
  return out;
}
