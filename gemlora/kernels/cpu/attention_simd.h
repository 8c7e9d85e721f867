// The vector inner loops of decode attention, included by attention.cpp twice, each time inside a
// `#pragma GCC target` block: GEMLORA_VEC_WIDTH 16 (AVX-512) and 8 (AVX2). Not a header to include
// elsewhere.
//
// Both loops keep four independent accumulator chains in flight (FMA latency is four cycles), however
// many query heads share the KV head: 4 heads x 1 key, 2 x 2 or 1 x 4 for the scores; 4 heads x 1,
// 2 x 2 or 1 x 4 partial sums for the values. Each key and value slice is loaded once for all heads.

namespace GEMLORA_VEC_NS {

#include "vec_ops.h"

// out[h * stride + k] = q[h] . keys[k], for NQ heads (rows of q, D apart) and NK keys
template <int NQ, int NK>
inline void qk_tile(const float* q, int64_t D, const float* const* keys, float* out, int64_t stride) {
  vec acc[NQ][NK];
  for (int h = 0; h < NQ; ++h)
    for (int k = 0; k < NK; ++k) acc[h][k] = vzero();
  for (int64_t i = 0; i < D; i += W) {
    vec kv[NK];
    for (int k = 0; k < NK; ++k) kv[k] = vload(keys[k] + i);
    for (int h = 0; h < NQ; ++h) {
      const vec qv = vload(q + h * D + i);
      for (int k = 0; k < NK; ++k) acc[h][k] = vfma(qv, kv[k], acc[h][k]);
    }
  }
  for (int h = 0; h < NQ; ++h)
    for (int k = 0; k < NK; ++k) out[h * stride + k] = vsum(acc[h][k]);
}

template <int NQ>
inline void qk_heads(const float* q, int64_t D, const float* const* keys, int64_t cnt, float* scores, int64_t stride) {
  constexpr int NK = 4 / NQ;
  int64_t j = 0;
  for (; j + NK <= cnt; j += NK) qk_tile<NQ, NK>(q, D, keys + j, scores + j, stride);
  for (; j < cnt; ++j) qk_tile<NQ, 1>(q, D, keys + j, scores + j, stride);
}

// scores[h * stride + j] = q[h] . keys[j] for the G heads of q and the cnt keys
inline void qk(const float* q, int64_t G, int64_t D, const float* const* keys, int64_t cnt, float* scores,
               int64_t stride) {
  for (int64_t h = 0; h < G;) {
    const int64_t left = G - h;
    if (left >= 4) {
      qk_heads<4>(q + h * D, D, keys, cnt, scores + h * stride, stride);
      h += 4;
    } else if (left >= 2) {
      qk_heads<2>(q + h * D, D, keys, cnt, scores + h * stride, stride);
      h += 2;
    } else {
      qk_heads<1>(q + h * D, D, keys, cnt, scores + h * stride, stride);
      h += 1;
    }
  }
}

// acc[h] += sum_j p[h * stride + j] * values[j], for NQ heads (rows of acc, D apart)
template <int NQ>
inline void pv_heads(float* acc, int64_t D, const float* const* values, const float* p, int64_t stride, int64_t cnt) {
  constexpr int U = 4 / NQ;    // partial sums per head, over alternating keys
  for (int64_t i = 0; i < D; i += W) {
    vec a[NQ][U];
    for (int h = 0; h < NQ; ++h) {
      a[h][0] = vload(acc + h * D + i);
      for (int u = 1; u < U; ++u) a[h][u] = vzero();
    }
    int64_t j = 0;
    for (; j + U <= cnt; j += U)
      for (int u = 0; u < U; ++u) {
        const vec v = vload(values[j + u] + i);
        for (int h = 0; h < NQ; ++h) a[h][u] = vfma(vset1(p[h * stride + j + u]), v, a[h][u]);
      }
    for (; j < cnt; ++j) {
      const vec v = vload(values[j] + i);
      for (int h = 0; h < NQ; ++h) a[h][0] = vfma(vset1(p[h * stride + j]), v, a[h][0]);
    }
    for (int h = 0; h < NQ; ++h) {
      vec s = a[h][0];
      for (int u = 1; u < U; ++u) s = vadd(s, a[h][u]);
      vstore(acc + h * D + i, s);
    }
  }
}

inline void pv(float* acc, int64_t G, int64_t D, const float* const* values, const float* p, int64_t stride,
               int64_t cnt) {
  for (int64_t h = 0; h < G;) {
    const int64_t left = G - h;
    if (left >= 4) {
      pv_heads<4>(acc + h * D, D, values, p + h * stride, stride, cnt);
      h += 4;
    } else if (left >= 2) {
      pv_heads<2>(acc + h * D, D, values, p + h * stride, stride, cnt);
      h += 2;
    } else {
      pv_heads<1>(acc + h * D, D, values, p + h * stride, stride, cnt);
      h += 1;
    }
  }
}

}  // namespace GEMLORA_VEC_NS
