// The activation quantizer (see activations.h): a scalar path, the reference of the others, and AVX2
// and AVX-512 paths that do the same fp32 operations per element (multiply, round to nearest even,
// multiply, subtract; no fused multiply-add) and so give the same bytes. Vectorised because a prefill
// quantizes every row of every projection: ~7% of a 32-request serving run with the scalar loop.

#include "activations.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace gemlora {
namespace {

// One row's blocks. Q: int8_t (L = 127, `passes` passes) or int16_t (L = 32767, one pass).
// q, d: this row in pass 0; pass p is q + p * pass_q, d + p * pass_d. s16: this row's K/16 sums.
struct RowOut {
  void* q;
  float* d;
  float* s16;
  int64_t pass_q, pass_d;
};

template <class Q>
void row_scalar(const float* x, int64_t k, int64_t passes, const RowOut& out) {
  constexpr float kLevels = sizeof(Q) == 1 ? 127.f : 32767.f;
  float rest[kBlock];
  for (int64_t b = 0; b < k / kBlock; ++b) {
    std::memcpy(rest, x + b * kBlock, sizeof rest);
    float sums[2] = {0.f, 0.f};
    for (int64_t p = 0; p < passes; ++p) {
      float amax = 0.f;
      for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(rest[i]));
      const float scale = amax / kLevels;
      const float inv = scale > 0.f ? 1.f / scale : 0.f;
      Q* qb = static_cast<Q*>(out.q) + p * out.pass_q + b * kBlock;
      int isums[2] = {0, 0};
      for (int i = 0; i < kBlock; ++i) {
        const float v = std::nearbyint(rest[i] * inv);
        qb[i] = static_cast<Q>(v);
        isums[i / 16] += static_cast<int>(v);
        rest[i] -= v * scale;
      }
      out.d[p * out.pass_d + b] = scale;
      sums[0] += scale * static_cast<float>(isums[0]);
      sums[1] += scale * static_cast<float>(isums[1]);
    }
    out.s16[2 * b] = sums[0];
    out.s16[2 * b + 1] = sums[1];
  }
}

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

AVX2_TARGET inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

AVX2_TARGET inline int hsum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <class Q>
AVX2_TARGET void row_avx2(const float* x, int64_t k, int64_t passes, const RowOut& out) {
  constexpr float kLevels = sizeof(Q) == 1 ? 127.f : 32767.f;
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t b = 0; b < k / kBlock; ++b) {
    __m256 rest[4];
    for (int j = 0; j < 4; ++j) rest[j] = _mm256_loadu_ps(x + b * kBlock + 8 * j);
    float sums[2] = {0.f, 0.f};
    for (int64_t p = 0; p < passes; ++p) {
      const __m256 amax8 = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, rest[0]), _mm256_andnot_ps(sign, rest[1])),
                                         _mm256_max_ps(_mm256_andnot_ps(sign, rest[2]), _mm256_andnot_ps(sign, rest[3])));
      const float scale = hmax8(amax8) / kLevels;
      const __m256 inv = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f), vscale = _mm256_set1_ps(scale);
      __m256i iv[4];
      for (int j = 0; j < 4; ++j) {
        const __m256 v = _mm256_round_ps(_mm256_mul_ps(rest[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        iv[j] = _mm256_cvtps_epi32(v);
        rest[j] = _mm256_sub_ps(rest[j], _mm256_mul_ps(v, vscale));
      }
      auto* qb = static_cast<Q*>(out.q) + p * out.pass_q + b * kBlock;
      const __m256i lo = _mm256_packs_epi32(iv[0], iv[1]), hi = _mm256_packs_epi32(iv[2], iv[3]);
      if (sizeof(Q) == 1) {   // packs interleave the 128-bit lanes: put the 4-byte groups back in order
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(lo, hi), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), bytes);
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), _mm256_permute4x64_epi64(lo, 0xD8));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + 16), _mm256_permute4x64_epi64(hi, 0xD8));
      }
      out.d[p * out.pass_d + b] = scale;
      sums[0] += scale * static_cast<float>(hsum8(_mm256_add_epi32(iv[0], iv[1])));
      sums[1] += scale * static_cast<float>(hsum8(_mm256_add_epi32(iv[2], iv[3])));
    }
    out.s16[2 * b] = sums[0];
    out.s16[2 * b + 1] = sums[1];
  }
}

template <class Q>
AVX512_TARGET void row_avx512(const float* x, int64_t k, int64_t passes, const RowOut& out) {
  constexpr float kLevels = sizeof(Q) == 1 ? 127.f : 32767.f;
  for (int64_t b = 0; b < k / kBlock; ++b) {
    __m512 rest[2] = {_mm512_loadu_ps(x + b * kBlock), _mm512_loadu_ps(x + b * kBlock + 16)};
    float sums[2] = {0.f, 0.f};
    for (int64_t p = 0; p < passes; ++p) {
      const float scale = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(rest[0]), _mm512_abs_ps(rest[1]))) / kLevels;
      const __m512 inv = _mm512_set1_ps(scale > 0.f ? 1.f / scale : 0.f), vscale = _mm512_set1_ps(scale);
      auto* qb = static_cast<Q*>(out.q) + p * out.pass_q + b * kBlock;
      for (int j = 0; j < 2; ++j) {
        const __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(rest[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512i iv = _mm512_cvtps_epi32(v);
        if (sizeof(Q) == 1) _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16 * j), _mm512_cvtsepi32_epi8(iv));
        else _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + 16 * j), _mm512_cvtsepi32_epi16(iv));
        sums[j] += scale * static_cast<float>(_mm512_reduce_add_epi32(iv));
        rest[j] = _mm512_sub_ps(rest[j], _mm512_mul_ps(v, vscale));
      }
      out.d[p * out.pass_d + b] = scale;
    }
    out.s16[2 * b] = sums[0];
    out.s16[2 * b + 1] = sums[1];
  }
}

template <class Q>
void quantize_rows(const float* x, int64_t m, int64_t k, int64_t passes, Q* q, float* d, float* s16, Isa isa) {
  const auto row = isa == Isa::kAvx512Vnni ? row_avx512<Q> : isa == Isa::kAvx2 ? row_avx2<Q> : row_scalar<Q>;
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      row(x + r * k, k, passes, RowOut{q + r * k, d + r * (k / kBlock), s16 + r * (k / 16), m * k, m * (k / kBlock)});
  });
}

}  // namespace

int64_t int8_passes(const std::string& activations) {
  if (activations == "int8") return 1;
  if (activations == "int8x2") return 2;
  TORCH_CHECK(activations == "int16", "activations must be int8, int8x2 or int16, got ", activations);
  return 0;
}

std::vector<torch::Tensor> quantize(const torch::Tensor& x, int64_t passes, Isa isa) {
  const int64_t m = x.size(0), k = x.size(1);
  auto opts = x.options();
  torch::Tensor q = torch::empty({std::max<int64_t>(passes, 1), m, k}, opts.dtype(passes ? torch::kChar : torch::kShort));
  torch::Tensor d = torch::empty({std::max<int64_t>(passes, 1), m, k / kBlock}, opts);
  torch::Tensor s16 = torch::empty({m, k / 16}, opts);
  if (m == 0) return {q, d, s16};
  if (passes) {
    quantize_rows(x.data_ptr<float>(), m, k, passes, q.data_ptr<int8_t>(), d.data_ptr<float>(), s16.data_ptr<float>(), isa);
  } else {
    quantize_rows(x.data_ptr<float>(), m, k, 1, q.data_ptr<int16_t>(), d.data_ptr<float>(), s16.data_ptr<float>(), isa);
  }
  return {q, d, s16};
}

}  // namespace gemlora

// The activation quantization alone, for the tests: (q [P,M,K], d [P,M,K/32], s16 [M,K/16]).
std::vector<torch::Tensor> quantize_activations(const torch::Tensor& x_in, const std::string& activations,
                                                const std::string& isa) {
  const torch::Tensor x = x_in.to(torch::kFloat).contiguous();
  TORCH_CHECK(x.dim() == 2 && x.size(1) % gemlora::kBlock == 0, "x must be [M, K] with K a multiple of 32");
  return gemlora::quantize(x, gemlora::int8_passes(activations), gemlora::parse_isa(isa));
}
