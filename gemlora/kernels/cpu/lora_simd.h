// The vector inner loops of the LoRA kernel, included by lora.cpp twice, each time inside a
// `#pragma GCC target` block: GEMLORA_VEC_WIDTH 16 (AVX-512) and 8 (AVX2). Not a header to include
// elsewhere. The same interface as lora.cpp's scalar loops.

namespace GEMLORA_VEC_NS {

#include "vec_ops.h"

// out[i * NA + a] = xs[i] . as[a] over n, for NX rows and NA adapter rows (NX * NA independent chains)
template <int NX, int NA>
void dot_tile(const float* const* xs, const float* const* as, int64_t n, float* out) {
  vec acc[NX][NA];
  for (int i = 0; i < NX; ++i)
    for (int a = 0; a < NA; ++a) acc[i][a] = vzero();
  int64_t k = 0;
  for (; k + W <= n; k += W) {
    vec av[NA];
    for (int a = 0; a < NA; ++a) av[a] = vload(as[a] + k);
    for (int i = 0; i < NX; ++i) {
      const vec xv = vload(xs[i] + k);
      for (int a = 0; a < NA; ++a) acc[i][a] = vfma(xv, av[a], acc[i][a]);
    }
  }
  for (int i = 0; i < NX; ++i)
    for (int a = 0; a < NA; ++a) {
      float s = vsum(acc[i][a]);
      for (int64_t t = k; t < n; ++t) s += xs[i][t] * as[a][t];
      out[i * NA + a] = s;
    }
}

// y += a * x over n
inline void axpy(float* y, float a, const float* x, int64_t n) {
  const vec av = vset1(a);
  int64_t k = 0;
  for (; k + W <= n; k += W) vstore(y + k, vfma(av, vload(x + k), vload(y + k)));
  for (; k < n; ++k) y[k] += a * x[k];
}

}  // namespace GEMLORA_VEC_NS
