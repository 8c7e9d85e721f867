// Quantized matmul on the CPU: y[M, N] = x[M, K] @ W[N, K]^T, W in 4- or 8-bit codes with per-group
// scales, x quantized on the fly in blocks of 32 (activations.h: int8, int8x2 or int16):
//   int8x2 is about as exact as int16 for twice the integer work, what AVX-512 VNNI's u8 x s8 dpbusd
//   does best; int16 is AVX2's cheapest exact-enough form (madd_epi16, no saturation games).
// Gemma's activations have large outliers: one int8 pass changes 2-3% of the 270M model's greedy
// tokens, int8x2 and int16 0.25% or less.
//
//   w[n, k] = (q[n, k] - offset) * s[n, g] + b[n, g]          g = k / group, group 16 or 32
//   y[m, n] = sum_g  s[n, g] * sum_p dx_p[m, k/32] * sum_{k in g} q[n, k] * xq_p[m, k]
//                  + (b[n, g] - offset * s[n, g]) * sum_p dx_p[m, k/32] * sum_{k in g} xq_p[m, k]
//
// Weight layout (made by `pack` in qmatmul.py from the device-independent row-major codes): rows in
// tiles of 16; per tile, per 32-wide K block, 8 "quads" of 16 rows x 4 consecutive k (64 bytes each):
// exactly what one AVX-512 VNNI `vpdpbusd` multiplies against 4 broadcast activation bytes. 4-bit
// codes pack quads 2c (low nibbles) and 2c+1 (high nibbles) into one 64-byte chunk. Scales and
// biases are [tiles, K / group, 16], fp16 or fp32.
//
// Paths, picked at run time by what the CPU has: AVX-512 VNNI, AVX2 (int8: maddubs/madd, with the
// sign trick for 8-bit codes so int16 sums never saturate; int16: codes zero-extended, madd_epi16),
// and a scalar one. All give the same integer dot products; only the order of the float accumulation
// differs. int16 activations on a VNNI CPU run the AVX2 int16 path.

#include "activations.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using namespace gemlora;

constexpr int kTile = 16;   // weight rows per tile

struct Weights {
  const uint8_t* codes;     // packed
  const void* scales;       // [tiles, K/group, 16]
  const void* bias;         // same, or nullptr
  bool half;                // scales/bias are fp16 (else fp32)
  int64_t n, k, bits, group, offset;
  int64_t tile_bytes_per_block() const { return bits == 8 ? 512 : 256; }
  int64_t groups() const { return k / group; }
};

inline float load_scalar(const void* p, bool half, int64_t i) {
  if (half) return c10::detail::fp16_ieee_to_fp32_value(static_cast<const uint16_t*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

// ---- scalar path (any x86-64; also the reference for the integer dot products) -----------------

inline int code_at(const Weights& w, const uint8_t* blk, int row, int kk) {
  // kk in [0, 32): quad kk/4, byte within the quad's 16x4 chunk
  const int quad = kk / 4, lane = row * 4 + kk % 4;
  if (w.bits == 8) return blk[quad * 64 + lane];
  const uint8_t byte = blk[(quad / 2) * 64 + lane];
  return quad % 2 == 0 ? (byte & 0x0F) : (byte >> 4);
}

template <class A>   // Activations (int8, one or two passes) or Activations16
void matmul_scalar(const Weights& w, const A& a, float* y, int64_t t0, int64_t t1) {
  const int64_t kb = w.k / kBlock, G = w.groups(), per_block = kBlock / w.group;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t m = 0; m < a.m; ++m) {
      float acc[kTile] = {0};
      for (int64_t b = 0; b < kb; ++b) {
        const uint8_t* blk = w.codes + (t * kb + b) * w.tile_bytes_per_block();
        for (int row = 0; row < kTile; ++row) {
          for (int64_t h = 0; h < per_block; ++h) {
            float dots = 0.f;   // sum over passes of dx_p * integer dot
            for (int64_t p = 0; p < a.passes; ++p) {
              const auto* xq = a.qp(p) + m * a.k + b * kBlock;
              int dot = 0;
              for (int64_t kk = h * w.group; kk < (h + 1) * w.group; ++kk) dot += code_at(w, blk, row, kk) * xq[kk];
              dots += a.dp(p)[m * kb + b] * static_cast<float>(dot);
            }
            const int64_t gi = (t * G + b * per_block + h) * kTile + row;
            const float s = load_scalar(w.scales, w.half, gi);
            const float bias = w.bias ? load_scalar(w.bias, w.half, gi) : 0.f;
            const float xsum = group_sum(a, m, b, h, w.group);
            acc[row] += s * dots + (bias - static_cast<float>(w.offset) * s) * xsum;
          }
        }
      }
      for (int row = 0; row < kTile; ++row) {
        const int64_t n = t * kTile + row;
        if (n < w.n) y[m * w.n + n] = acc[row];
      }
    }
  }
}

// ---- AVX2 path ------------------------------------------------------------------------------------

__attribute__((target("avx2,fma,f16c")))
inline __m256 load8(const void* p, bool half, int64_t i) {
  if (half) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  return _mm256_loadu_ps(static_cast<const float*>(p) + i);
}

// sum over 4 bytes per int32 lane of u8 * s8, without int16 saturation for 4-bit codes (<= 2*15*127)
__attribute__((target("avx2,fma,f16c")))
inline __m256i dot4_u4(__m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}

// 8-bit codes: (w - 128) is signed; |w - 128| * sign(x) keeps every int16 pair sum <= 2*128*127
__attribute__((target("avx2,fma,f16c")))
inline __m256i dot4_s8(__m256i w_u8, __m256i x) {
  const __m256i ws = _mm256_xor_si256(w_u8, _mm256_set1_epi8(static_cast<char>(0x80)));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(x, ws)), _mm256_set1_epi16(1));
}

template <int MB, int BITS, int PASSES, int GROUP>
__attribute__((target("avx2,fma,f16c")))
void tile_avx2(const Weights& w, const Activations& a, float* y, int64_t t, int64_t m0) {
  // every loop bound a constant: the accumulator arrays below then live in registers
  constexpr int per_block = kBlock / GROUP, kQuads = GROUP / 4;
  const int64_t kb = w.k / kBlock, G = w.groups();
  // 8-bit codes are dotted as (q - 128): fold the 128 back in through the sum term
  const float off = static_cast<float>(w.offset - (BITS == 8 ? 128 : 0));
  __m256 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* blk = w.codes + (t * kb + b) * w.tile_bytes_per_block();
    const int32_t* xq4[PASSES][MB];
    for (int p = 0; p < PASSES; ++p)
      for (int m = 0; m < MB; ++m) xq4[p][m] = reinterpret_cast<const int32_t*>(a.qp(p) + (m0 + m) * a.k + b * kBlock);
    for (int hg = 0; hg < per_block; ++hg) {
      __m256i isum[PASSES][MB][2];
      for (int p = 0; p < PASSES; ++p)
        for (int m = 0; m < MB; ++m) isum[p][m][0] = isum[p][m][1] = _mm256_setzero_si256();
      // quad by quad, every row and pass: independent accumulation chains, so they overlap
      for (int jj = 0; jj < kQuads; ++jj) {
        const int j = hg * kQuads + jj;
        __m256i wq[2];
        if (BITS == 8) {
          wq[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + j * 64));
          wq[1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + j * 64 + 32));
        } else {
          const __m256i lo = _mm256_set1_epi8(0x0F);
          for (int h = 0; h < 2; ++h) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + (j / 2) * 64 + h * 32));
            wq[h] = j % 2 == 0 ? _mm256_and_si256(v, lo) : _mm256_and_si256(_mm256_srli_epi16(v, 4), lo);
          }
        }
        for (int p = 0; p < PASSES; ++p)
          for (int m = 0; m < MB; ++m) {
            const __m256i xb = _mm256_set1_epi32(xq4[p][m][j]);
            for (int h = 0; h < 2; ++h)
              isum[p][m][h] = _mm256_add_epi32(isum[p][m][h], BITS == 8 ? dot4_s8(wq[h], xb) : dot4_u4(wq[h], xb));
          }
      }
      const int64_t gi = (t * G + b * per_block + hg) * kTile;
      __m256 s[2], beff[2];
      for (int h = 0; h < 2; ++h) {
        s[h] = load8(w.scales, w.half, gi + 8 * h);
        const __m256 bias = w.bias ? load8(w.bias, w.half, gi + 8 * h) : _mm256_setzero_ps();
        beff[h] = _mm256_fnmadd_ps(_mm256_set1_ps(off), s[h], bias);
      }
      for (int m = 0; m < MB; ++m) {
        const __m256 xsum = _mm256_set1_ps(group_sum(a, m0 + m, b, hg, GROUP));
        for (int h = 0; h < 2; ++h) {
          __m256 dots = _mm256_setzero_ps();
          for (int p = 0; p < PASSES; ++p)
            dots = _mm256_fmadd_ps(_mm256_set1_ps(a.dp(p)[(m0 + m) * kb + b]), _mm256_cvtepi32_ps(isum[p][m][h]), dots);
          acc[m][h] = _mm256_fmadd_ps(s[h], dots, acc[m][h]);
          acc[m][h] = _mm256_fmadd_ps(beff[h], xsum, acc[m][h]);
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m) {
    float out[kTile];
    _mm256_storeu_ps(out, acc[m][0]);
    _mm256_storeu_ps(out + 8, acc[m][1]);
    const int64_t n0 = t * kTile, cnt = std::min<int64_t>(kTile, w.n - n0);
    std::memcpy(y + (m0 + m) * w.n + n0, out, cnt * sizeof(float));
  }
}

// int16 activations. A tile's two 8-row halves run one after the other (registers: 3 per row). Per
// quad, the half's 32 code bytes (8 rows x 4 k) zero-extend in-lane to int16: unpacklo holds rows
// 0, 1 | 4, 5 and unpackhi rows 2, 3 | 6, 7, 4 k each, so one broadcast of the quad's 4 activations
// serves every row, madd_epi16 sums k pairs, and hadd_epi32 of the two at the group's end gives rows
// 0..7 in order. |sum| <= 32 * 255 * 32767 < 2^31: no overflow, no saturation.
template <int MB, int BITS, int GROUP>
__attribute__((target("avx2,fma,f16c")))
void tile_avx2_a16(const Weights& w, const Activations16& a, float* y, int64_t t, int64_t m0) {
  constexpr int per_block = kBlock / GROUP, kQuads = GROUP / 4;
  const int64_t kb = w.k / kBlock, G = w.groups();
  const float off = static_cast<float>(w.offset);
  const __m256i zero = _mm256_setzero_si256(), lo4 = _mm256_set1_epi8(0x0F);
  for (int h = 0; h < 2; ++h) {
    const int64_t n0 = t * kTile + 8 * h;
    if (n0 >= w.n) break;
    __m256 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < kb; ++b) {
      const uint8_t* blk = w.codes + (t * kb + b) * w.tile_bytes_per_block() + 32 * h;
      const int64_t* x4[MB];      // a quad's 4 int16 activations as one 64-bit word
      for (int m = 0; m < MB; ++m) x4[m] = reinterpret_cast<const int64_t*>(a.q + (m0 + m) * a.k + b * kBlock);
      for (int hg = 0; hg < per_block; ++hg) {
        __m256i lo[MB], hi[MB];
        for (int m = 0; m < MB; ++m) lo[m] = hi[m] = _mm256_setzero_si256();
        for (int jj = 0; jj < kQuads; ++jj) {
          const int j = hg * kQuads + jj;
          __m256i v;
          if (BITS == 8) {
            v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + j * 64));
          } else {
            const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + (j / 2) * 64));
            v = j % 2 == 0 ? _mm256_and_si256(raw, lo4) : _mm256_and_si256(_mm256_srli_epi16(raw, 4), lo4);
          }
          const __m256i wl = _mm256_unpacklo_epi8(v, zero), wh = _mm256_unpackhi_epi8(v, zero);
          for (int m = 0; m < MB; ++m) {
            const __m256i xb = _mm256_set1_epi64x(x4[m][j]);
            lo[m] = _mm256_add_epi32(lo[m], _mm256_madd_epi16(wl, xb));
            hi[m] = _mm256_add_epi32(hi[m], _mm256_madd_epi16(wh, xb));
          }
        }
        const int64_t gi = (t * G + b * per_block + hg) * kTile + 8 * h;
        const __m256 s = load8(w.scales, w.half, gi);
        const __m256 bias = w.bias ? load8(w.bias, w.half, gi) : _mm256_setzero_ps();
        const __m256 beff = _mm256_fnmadd_ps(_mm256_set1_ps(off), s, bias);
        for (int m = 0; m < MB; ++m) {
          const __m256 dots = _mm256_mul_ps(_mm256_set1_ps(a.d[(m0 + m) * kb + b]),
                                            _mm256_cvtepi32_ps(_mm256_hadd_epi32(lo[m], hi[m])));
          acc[m] = _mm256_fmadd_ps(s, dots, acc[m]);
          acc[m] = _mm256_fmadd_ps(beff, _mm256_set1_ps(group_sum(a, m0 + m, b, hg, GROUP)), acc[m]);
        }
      }
    }
    const int64_t cnt = std::min<int64_t>(8, w.n - n0);
    for (int m = 0; m < MB; ++m) {
      float out[8];
      _mm256_storeu_ps(out, acc[m]);
      std::memcpy(y + (m0 + m) * w.n + n0, out, cnt * sizeof(float));
    }
  }
}

// ---- AVX-512 VNNI path ------------------------------------------------------------------------------

#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))

VNNI_TARGET inline __m512 load16(const void* p, bool half, int64_t i) {
  if (half) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
  return _mm512_loadu_ps(static_cast<const float*>(p) + i);
}

template <int MB, int BITS, int PASSES, int GROUP>
VNNI_TARGET void tile_vnni(const Weights& w, const Activations& a, float* y, int64_t t, int64_t m0) {
  // every loop bound a constant: the accumulator arrays below then live in registers
  constexpr int per_block = kBlock / GROUP, kQuads = GROUP / 4;
  const int64_t kb = w.k / kBlock, G = w.groups();
  const float off = static_cast<float>(w.offset);
  // one row and pass alone would be one chain of dependent dpbusd: split it in two to overlap them
  constexpr int kChains = MB * PASSES >= 4 ? 1 : 2;
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* blk = w.codes + (t * kb + b) * w.tile_bytes_per_block();
    __m512i wq[8];
    if (BITS == 8) {
      for (int j = 0; j < 8; ++j) wq[j] = _mm512_loadu_si512(blk + j * 64);
    } else {
      const __m512i lo = _mm512_set1_epi8(0x0F);
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512(blk + c * 64);
        wq[2 * c] = _mm512_and_si512(v, lo);
        wq[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo);
      }
    }
    const int32_t* xq4[PASSES][MB];
    for (int p = 0; p < PASSES; ++p)
      for (int m = 0; m < MB; ++m) xq4[p][m] = reinterpret_cast<const int32_t*>(a.qp(p) + (m0 + m) * a.k + b * kBlock);
    for (int hg = 0; hg < per_block; ++hg) {
      __m512i isum[PASSES][MB][kChains];
      for (int p = 0; p < PASSES; ++p)
        for (int m = 0; m < MB; ++m)
          for (int c = 0; c < kChains; ++c) isum[p][m][c] = _mm512_setzero_si512();
      // quad by quad, every row and pass: independent accumulation chains, so they overlap
      for (int jj = 0; jj < kQuads; ++jj) {
        const int j = hg * kQuads + jj;
        for (int p = 0; p < PASSES; ++p)
          for (int m = 0; m < MB; ++m)
            isum[p][m][jj % kChains] = _mm512_dpbusd_epi32(isum[p][m][jj % kChains], wq[j],
                                                           _mm512_set1_epi32(xq4[p][m][j]));
      }
      const int64_t gi = (t * G + b * per_block + hg) * kTile;
      const __m512 s = load16(w.scales, w.half, gi);
      const __m512 bias = w.bias ? load16(w.bias, w.half, gi) : _mm512_setzero_ps();
      const __m512 beff = _mm512_fnmadd_ps(_mm512_set1_ps(off), s, bias);
      for (int m = 0; m < MB; ++m) {
        __m512 dots = _mm512_setzero_ps();
        for (int p = 0; p < PASSES; ++p) {
          __m512i total = isum[p][m][0];
          if (kChains == 2) total = _mm512_add_epi32(total, isum[p][m][kChains - 1]);
          dots = _mm512_fmadd_ps(_mm512_set1_ps(a.dp(p)[(m0 + m) * kb + b]), _mm512_cvtepi32_ps(total), dots);
        }
        acc[m] = _mm512_fmadd_ps(s, dots, acc[m]);
        acc[m] = _mm512_fmadd_ps(beff, _mm512_set1_ps(group_sum(a, m0 + m, b, hg, GROUP)), acc[m]);
      }
    }
  }
  const int64_t n0 = t * kTile, cnt = std::min<int64_t>(kTile, w.n - n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << cnt) - 1u);
  for (int m = 0; m < MB; ++m) _mm512_mask_storeu_ps(y + (m0 + m) * w.n + n0, mask, acc[m]);
}

// ---- dispatch ---------------------------------------------------------------------------------------

template <int MB, int BITS, int PASSES, int GROUP>
struct Vnni { static void run(const Weights& w, const Activations& a, float* y, int64_t t, int64_t m0) { tile_vnni<MB, BITS, PASSES, GROUP>(w, a, y, t, m0); } };
template <int MB, int BITS, int PASSES, int GROUP>
struct Avx2 { static void run(const Weights& w, const Activations& a, float* y, int64_t t, int64_t m0) { tile_avx2<MB, BITS, PASSES, GROUP>(w, a, y, t, m0); } };

// MAX: activation rows sharing one pass over a weight tile (what the ISA's registers hold)
template <template <int, int, int, int> class K, int BITS, int PASSES, int GROUP, int MAX>
void run_rows(const Weights& w, const Activations& a, float* y, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t m = 0;
    for (; m + MAX <= a.m; m += MAX) K<MAX, BITS, PASSES, GROUP>::run(w, a, y, t, m);
    switch (a.m - m) {
      case 3: K<3, BITS, PASSES, GROUP>::run(w, a, y, t, m); break;
      case 2: K<2, BITS, PASSES, GROUP>::run(w, a, y, t, m); break;
      case 1: K<1, BITS, PASSES, GROUP>::run(w, a, y, t, m); break;
      default: break;
    }
  }
}

// The format's compile-time parameters, picked once per call.
template <template <int, int, int, int> class K, int MAX1, int MAX2>
void run_tiles(const Weights& w, const Activations& a, float* y, int64_t t0, int64_t t1) {
  const bool two = a.passes == 2, g16 = w.group == 16;
#define GEMLORA_ROWS(B, P, G, M) run_rows<K, B, P, G, M>(w, a, y, t0, t1)
  if (w.bits == 8) {
    if (two) g16 ? GEMLORA_ROWS(8, 2, 16, MAX2) : GEMLORA_ROWS(8, 2, 32, MAX2);
    else g16 ? GEMLORA_ROWS(8, 1, 16, MAX1) : GEMLORA_ROWS(8, 1, 32, MAX1);
  } else {
    if (two) g16 ? GEMLORA_ROWS(4, 2, 16, MAX2) : GEMLORA_ROWS(4, 2, 32, MAX2);
    else g16 ? GEMLORA_ROWS(4, 1, 16, MAX1) : GEMLORA_ROWS(4, 1, 32, MAX1);
  }
#undef GEMLORA_ROWS
}

template <int BITS, int GROUP>
void rows_a16(const Weights& w, const Activations16& a, float* y, int64_t t0, int64_t t1) {
  constexpr int kMax = 3;   // 3 registers per row, 16 in all
  for (int64_t t = t0; t < t1; ++t) {
    int64_t m = 0;
    for (; m + kMax <= a.m; m += kMax) tile_avx2_a16<kMax, BITS, GROUP>(w, a, y, t, m);
    switch (a.m - m) {
      case 2: tile_avx2_a16<2, BITS, GROUP>(w, a, y, t, m); break;
      case 1: tile_avx2_a16<1, BITS, GROUP>(w, a, y, t, m); break;
      default: break;
    }
  }
}

int64_t tile_grain(int64_t tiles) {
  // enough tiles per task that threads do not contend, few enough that both cores stay busy
  return std::max<int64_t>(1, std::min<int64_t>(64, tiles / (4 * at::get_num_threads())));
}

// A thread's tiles against many activation rows (a prefill's thousands), blocked for the caches:
// chunks of tiles of ~256 KB stay in L2 while slices of ~24 KB of activation rows, in L1, pass over
// them, so each weight byte is read from memory once and each activation row once per chunk rather
// than once per tile. A multiple of 12 rows per slice, so each ISA's row groups are full.
template <class A, class F>
void blocked(const Weights& w, const A& a, int64_t bytes_per_row, float* y, int64_t t0, int64_t t1, F&& tiles) {
  const int64_t slice = std::max<int64_t>(12, (24 << 10) / std::max<int64_t>(bytes_per_row, 1) / 12 * 12);
  if (a.m <= slice) return tiles(a, y, t0, t1);
  const int64_t chunk = std::max<int64_t>(1, (256 << 10) / ((w.k / kBlock) * w.tile_bytes_per_block()));
  for (int64_t c0 = t0; c0 < t1; c0 += chunk)
    for (int64_t m0 = 0; m0 < a.m; m0 += slice)
      tiles(a.rows(m0, std::min(slice, a.m - m0)), y + m0 * w.n, c0, std::min(c0 + chunk, t1));
}

void run_a16(const Weights& w, const Activations16& a, float* y, Isa isa) {
  const int64_t tiles = (w.n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, tile_grain(tiles), [&](int64_t begin, int64_t end) {
    blocked(w, a, 2 * a.k, y, begin, end, [&](const Activations16& part, float* yp, int64_t t0, int64_t t1) {
      if (isa == Isa::kScalar) {
        matmul_scalar(w, part, yp, t0, t1);
      } else if (w.bits == 8) {
        w.group == 16 ? rows_a16<8, 16>(w, part, yp, t0, t1) : rows_a16<8, 32>(w, part, yp, t0, t1);
      } else {
        w.group == 16 ? rows_a16<4, 16>(w, part, yp, t0, t1) : rows_a16<4, 32>(w, part, yp, t0, t1);
      }
    });
  });
}

void run(const Weights& w, const Activations& a, float* y, Isa isa) {
  const int64_t tiles = (w.n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, tile_grain(tiles), [&](int64_t begin, int64_t end) {
    blocked(w, a, a.passes * a.k, y, begin, end, [&](const Activations& part, float* yp, int64_t t0, int64_t t1) {
      if (isa == Isa::kAvx512Vnni) {
        run_tiles<Vnni, 4, 4>(w, part, yp, t0, t1);
      } else if (isa == Isa::kAvx2) {   // 16 ymm registers: fewer rows at once
        run_tiles<Avx2, 3, 2>(w, part, yp, t0, t1);
      } else {
        matmul_scalar(w, part, yp, t0, t1);
      }
    });
  });
}

Weights make_weights(const torch::Tensor& packed, const torch::Tensor& scales, const c10::optional<torch::Tensor>& bias,
                     int64_t n, int64_t k, int64_t bits, int64_t group, int64_t offset) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(group == 16 || group == 32, "group must be 16 or 32");
  TORCH_CHECK(k % kBlock == 0, "K must be a multiple of 32, got ", k);
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.is_contiguous(), "packed codes must be contiguous uint8");
  const int64_t tiles = (n + kTile - 1) / kTile;
  TORCH_CHECK(packed.numel() == tiles * (k / kBlock) * (bits == 8 ? 512 : 256), "packed codes have the wrong size");
  TORCH_CHECK(scales.is_contiguous() && (scales.dtype() == torch::kHalf || scales.dtype() == torch::kFloat),
              "scales must be contiguous fp16 or fp32");
  TORCH_CHECK(scales.numel() == tiles * (k / group) * kTile, "scales have the wrong size");
  if (bias) {
    TORCH_CHECK(bias->dtype() == scales.dtype() && bias->is_contiguous() && bias->numel() == scales.numel(),
                "bias must match the scales");
  }
  return Weights{packed.data_ptr<uint8_t>(), scales.data_ptr(), bias ? bias->data_ptr() : nullptr,
                 scales.dtype() == torch::kHalf, n, k, bits, group, offset};
}

// Row r of W dequantized to float32 into out[k], with the reference's rounding: fl(fl(q - offset) * s) + b
void dequantize_row(const Weights& w, int64_t r, float* out) {
  const int64_t kb = w.k / kBlock, G = w.groups(), t = r / kTile;
  const int row = static_cast<int>(r % kTile);
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* blk = w.codes + (t * kb + b) * w.tile_bytes_per_block();
    for (int kk = 0; kk < kBlock; ++kk) {
      const int64_t gi = (t * G + (b * kBlock + kk) / w.group) * kTile + row;
      const float s = load_scalar(w.scales, w.half, gi);
      const float bias_v = w.bias ? load_scalar(w.bias, w.half, gi) : 0.f;
      out[b * kBlock + kk] = static_cast<float>(code_at(w, blk, row, kk) - w.offset) * s + bias_v;
    }
  }
}

}  // namespace

torch::Tensor qmatmul(const torch::Tensor& x_in, const torch::Tensor& packed, const torch::Tensor& scales,
                      const c10::optional<torch::Tensor>& bias, int64_t n, int64_t k, int64_t bits, int64_t group,
                      int64_t offset, const std::string& activations, const std::string& isa) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == k, "x must be [M, ", k, "]");
  const int64_t passes = int8_passes(activations);
  const Isa path = parse_isa(isa);
  const torch::Tensor x = x_in.to(torch::kFloat).contiguous();
  const Weights w = make_weights(packed, scales, bias, n, k, bits, group, offset);
  const int64_t m = x.size(0);
  torch::Tensor y = torch::empty({m, n}, x.options());
  if (m == 0) return y;
  const auto qa = quantize(x, passes, path);
  if (passes) {
    const Activations a{qa[0].data_ptr<int8_t>(), qa[1].data_ptr<float>(), qa[2].data_ptr<float>(), m, k, passes, m};
    run(w, a, y.data_ptr<float>(), path);
  } else {
    const Activations16 a{qa[0].data_ptr<int16_t>(), qa[1].data_ptr<float>(), qa[2].data_ptr<float>(), m, k};
    run_a16(w, a, y.data_ptr<float>(), path);
  }
  return y;
}

// y[m, j] = W[ids[m, j]] . x[m] for a few rows per activation row, computed as the reference does:
// the activations quantized as the kernels quantize them, the rows dequantized, the products summed in
// float64 (so it equals qmatmul's entries to float rounding). What the screened LM head rescores with.
torch::Tensor qmatmul_rows(const torch::Tensor& x_in, const torch::Tensor& ids_in, const torch::Tensor& packed,
                           const torch::Tensor& scales, const c10::optional<torch::Tensor>& bias, int64_t n,
                           int64_t k, int64_t bits, int64_t group, int64_t offset, const std::string& activations) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == k, "x must be [M, ", k, "]");
  TORCH_CHECK(ids_in.dim() == 2 && ids_in.size(0) == x_in.size(0), "ids must be [M, C]");
  const Weights w = make_weights(packed, scales, bias, n, k, bits, group, offset);
  const torch::Tensor x = x_in.to(torch::kFloat).contiguous();
  const torch::Tensor ids = ids_in.to(torch::kLong).contiguous();
  const int64_t M = x.size(0), C = ids.size(1), passes = int8_passes(activations), kb = k / kBlock;
  const int64_t* idp = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < M * C; ++i) TORCH_CHECK(idp[i] >= 0 && idp[i] < n, "row id ", idp[i], " out of range");
  // the activations as the kernels multiply them, in float64: sum over passes of q * d
  const auto qa = quantize(x, passes, best_isa());
  std::vector<double> xq(M * k, 0.0);
  const float* d = qa[1].data_ptr<float>();
  const int8_t* q8 = passes ? qa[0].data_ptr<int8_t>() : nullptr;
  const int16_t* q16 = passes ? nullptr : qa[0].data_ptr<int16_t>();
  for (int64_t p = 0; p < std::max<int64_t>(passes, 1); ++p)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < k; ++i) {
        const int64_t at = (p * M + m) * k + i;
        const double q = q8 ? q8[at] : q16[at];
        xq[m * k + i] += q * static_cast<double>(d[(p * M + m) * kb + i / kBlock]);
      }
  torch::Tensor y = torch::empty({M, C}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M * C, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> wrow(k);
    for (int64_t j = begin; j < end; ++j) {
      dequantize_row(w, idp[j], wrow.data());
      const double* xm = xq.data() + (j / C) * k;
      double acc = 0.0;
      for (int64_t i = 0; i < k; ++i) acc += static_cast<double>(wrow[i]) * xm[i];
      yp[j] = static_cast<float>(acc);
    }
  });
  return y;
}

// Rows `ids` of W, dequantized to float32: the embedding lookup of a quantized (tied) table.
torch::Tensor dequantize_rows(const torch::Tensor& ids_in, const torch::Tensor& packed, const torch::Tensor& scales,
                              const c10::optional<torch::Tensor>& bias, int64_t n, int64_t k, int64_t bits,
                              int64_t group, int64_t offset) {
  const Weights w = make_weights(packed, scales, bias, n, k, bits, group, offset);
  const torch::Tensor ids = ids_in.to(torch::kLong).contiguous();
  const int64_t T = ids.numel();
  const int64_t* idp = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < T; ++i) TORCH_CHECK(idp[i] >= 0 && idp[i] < n, "row id ", idp[i], " out of range [0, ", n, ")");
  torch::Tensor out = torch::empty({T, k}, torch::TensorOptions().dtype(torch::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dequantize_row(w, idp[i], o + i * k);
  });
  return out;
}

std::string cpu_isa() { return isa_name(best_isa()); }
