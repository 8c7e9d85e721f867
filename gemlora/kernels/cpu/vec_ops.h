// One float vector's operations for the kernels' vector inner loops (attention_simd.h, lora_simd.h),
// included inside their GEMLORA_VEC_NS namespace under a `#pragma GCC target` block:
// GEMLORA_VEC_WIDTH 16 (AVX-512) or 8 (AVX2). Not a header to include elsewhere.

#if GEMLORA_VEC_WIDTH == 16
using vec = __m512;
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset1(float x) { return _mm512_set1_ps(x); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
#else
using vec = __m256;
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vset1(float x) { return _mm256_set1_ps(x); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline float vsum(vec v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#endif
constexpr int64_t W = GEMLORA_VEC_WIDTH;
