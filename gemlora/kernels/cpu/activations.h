// Activations quantized for the integer matmul (qmatmul.cpp): rows of x [M, K] float32 in blocks of 32
// along K, one fp32 scale per block, in one of three forms:
//   int8    one int8 pass, as llama.cpp does;
//   int8x2  two: the residual x - dx * xq is quantized the same way and multiplied too;
//   int16   one int16 pass.
// Per block and pass: d = amax(rest) / L, q = round(rest * (1 / d)) (to nearest even), rest -= q * d,
// L = 127 or 32767, all in fp32: exactly gemlora/kernels/qmatmul.py's reference_quantize_activations,
// on every vector path. Knows nothing of weights.
#pragma once

#include "isa.h"

#include <torch/extension.h>

#include <cstdint>
#include <string>
#include <vector>

namespace gemlora {

constexpr int kBlock = 32;  // activation quantization block along K

struct Activations {
  const int8_t* q;          // [passes, M, K]
  const float* d;           // [passes, M, K/32]   scale of each block
  const float* s16;         // [M, K/16]   sum over the passes of d * (sum of q over each 16 elements)
  int64_t m, k, passes;
  int64_t pass_rows;        // rows between one pass and the next (m, unless this is a slice of rows)
  const int8_t* qp(int64_t p) const { return q + p * pass_rows * k; }
  const float* dp(int64_t p) const { return d + p * pass_rows * (k / 32); }
  Activations rows(int64_t m0, int64_t count) const {
    return {q + m0 * k, d + m0 * (k / 32), s16 + m0 * (k / 16), count, k, passes, pass_rows};
  }
};

// int16 activations: one pass
struct Activations16 {
  const int16_t* q;         // [M, K]
  const float* d;           // [M, K/32]
  const float* s16;         // [M, K/16]   d * (sum of q over each 16 elements)
  int64_t m, k;
  static constexpr int64_t passes = 1;     // the interface of Activations, for the scalar path
  const int16_t* qp(int64_t) const { return q; }
  const float* dp(int64_t) const { return d; }
  Activations16 rows(int64_t m0, int64_t count) const {
    return {q + m0 * k, d + m0 * (k / 32), s16 + m0 * (k / 16), count, k};
  }
};

// d * (sum of the quantized activations) over weight group hg of 32-block b (all passes)
template <class A>
inline float group_sum(const A& a, int64_t m, int64_t b, int64_t hg, int64_t group) {
  const float* s = a.s16 + m * (a.k / 16) + 2 * b;
  return group == 16 ? s[hg] : s[0] + s[1];
}

// "int8" -> 1 int8 pass, "int8x2" -> 2, "int16" -> 0 (one int16 pass)
int64_t int8_passes(const std::string& activations);

// x [M, K] float32 contiguous -> (q [P, M, K] int8 or [1, M, K] int16, d [P or 1, M, K/32], s16 [M, K/16]),
// on `isa`'s vector path (every path gives the same bytes)
std::vector<torch::Tensor> quantize(const torch::Tensor& x, int64_t passes, Isa isa);

}  // namespace gemlora
