// The LoRA delta of one projection for a step whose rows use different adapters, segmented by adapter,
// each segment at its own adapter's rank (gemlora/kernels/lora.py holds the plain-torch reference):
//
//   for every row t with slot s = row_slot[t] >= 0, rank r = slot_rank[s], and every packed part p
//   (q|k|v, gate|up) that slot s patches:
//     z[t, p, :r]       = row_scale[t] * (x[t] . A[s, p, j]  for j < r)          the shrink
//     y[t, lo_p:hi_p]  += sum_{j < r} z[t, p, j] * B[s, j, lo_p:hi_p]            the expand, j ascending
//
// A is [slots, parts, max_rank, in] and B [slots, max_rank, out] (float32, contiguous), as
// gemlora.lora.slots.LoRASlots stores them. Every adapter's weights are read once per call whatever
// the number of its rows, and never past its own rank: a rank-8 adapter beside a rank-64 one costs
// rank 8. Rows without an adapter are not touched.
//
// What it replaces on the CPU: the padded, gathered bmm of gemlora.lora.batch (every segment padded to
// the step's widest rank and longest segment), and the Python around it; and it lets the decode stack
// (decode_stack.cpp) run steps with adapters, so the same call serves both and they agree bit for bit.
//
// Each output element is written by one work item, summing in a fixed order: the result does not
// depend on the thread count.

#include "isa.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

namespace {

// Output columns per expand work item: within one part, so that an item reads one part's z.
constexpr int64_t kColumnChunk = 256;

// out[i * NA + a] = xs[i] . as[a] over n, for NX rows and NA adapter rows (NX * NA independent chains)
namespace scalar {
template <int NX, int NA>
void dot_tile(const float* const* xs, const float* const* as, int64_t n, float* out) {
  for (int i = 0; i < NX; ++i)
    for (int a = 0; a < NA; ++a) {
      float s = 0.f;
      for (int64_t k = 0; k < n; ++k) s += xs[i][k] * as[a][k];
      out[i * NA + a] = s;
    }
}
void axpy(float* y, float a, const float* x, int64_t n) {
  for (int64_t k = 0; k < n; ++k) y[k] += a * x[k];
}
}  // namespace scalar

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#define GEMLORA_VEC_NS avx512
#define GEMLORA_VEC_WIDTH 16
#include "lora_simd.h"
#undef GEMLORA_VEC_NS
#undef GEMLORA_VEC_WIDTH
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define GEMLORA_VEC_NS avx2
#define GEMLORA_VEC_WIDTH 8
#include "lora_simd.h"
#undef GEMLORA_VEC_NS
#undef GEMLORA_VEC_WIDTH
#pragma GCC pop_options

struct Loops {
  void (*d41)(const float* const*, const float* const*, int64_t, float*);   // 4 rows x 1 adapter row
  void (*d22)(const float* const*, const float* const*, int64_t, float*);
  void (*d14)(const float* const*, const float* const*, int64_t, float*);
  void (*d11)(const float* const*, const float* const*, int64_t, float*);
  void (*axpy)(float*, float, const float*, int64_t);
};

Loops loops(const std::string& isa) {
  TORCH_CHECK(isa == "auto" || isa == "avx512" || isa == "avx2" || isa == "scalar", "unknown isa ", isa);
  __builtin_cpu_init();
  const bool avx512 = gemlora::isa_allowed(gemlora::Isa::kAvx512Vnni) && __builtin_cpu_supports("avx512f");
  const bool avx2 = gemlora::isa_allowed(gemlora::Isa::kAvx2) && __builtin_cpu_supports("avx2") &&
                    __builtin_cpu_supports("fma");
  TORCH_CHECK((isa != "avx512" || avx512) && (isa != "avx2" || avx2), "this CPU cannot run ", isa);
  if (avx512 && (isa == "auto" || isa == "avx512"))
    return {avx512::dot_tile<4, 1>, avx512::dot_tile<2, 2>, avx512::dot_tile<1, 4>, avx512::dot_tile<1, 1>,
            avx512::axpy};
  if (avx2 && (isa == "auto" || isa == "avx2"))
    return {avx2::dot_tile<4, 1>, avx2::dot_tile<2, 2>, avx2::dot_tile<1, 4>, avx2::dot_tile<1, 1>, avx2::axpy};
  return {scalar::dot_tile<4, 1>, scalar::dot_tile<2, 2>, scalar::dot_tile<1, 4>, scalar::dot_tile<1, 1>,
          scalar::axpy};
}

// z[i * zs + j] = scale_i * xs[i] . as[j], for the nx rows and na adapter rows, four chains at a time
void shrink(const Loops& f, const float* const* xs, const float* scales, int64_t nx, const float* const* as,
            int64_t na, int64_t n, float* z, int64_t zs) {
  float tile[4];
  int64_t i = 0;
  for (; i + 4 <= nx; i += 4)
    for (int64_t j = 0; j < na; ++j) {
      f.d41(xs + i, as + j, n, tile);
      for (int u = 0; u < 4; ++u) z[(i + u) * zs + j] = scales[i + u] * tile[u];
    }
  for (; i + 2 <= nx; i += 2) {
    int64_t j = 0;
    for (; j + 2 <= na; j += 2) {
      f.d22(xs + i, as + j, n, tile);
      for (int u = 0; u < 2; ++u)
        for (int v = 0; v < 2; ++v) z[(i + u) * zs + j + v] = scales[i + u] * tile[u * 2 + v];
    }
    for (; j < na; ++j)
      for (int u = 0; u < 2; ++u) {
        f.d11(xs + i + u, as + j, n, tile);
        z[(i + u) * zs + j] = scales[i + u] * tile[0];
      }
  }
  for (; i < nx; ++i) {
    int64_t j = 0;
    for (; j + 4 <= na; j += 4) {
      f.d14(xs + i, as + j, n, tile);
      for (int v = 0; v < 4; ++v) z[i * zs + j + v] = scales[i] * tile[v];
    }
    for (; j < na; ++j) {
      f.d11(xs + i, as + j, n, tile);
      z[i * zs + j] = scales[i] * tile[0];
    }
  }
}

}  // namespace

void lora_delta_(torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& A, const torch::Tensor& B,
                 const torch::Tensor& row_slot, const torch::Tensor& row_scale, const torch::Tensor& slot_rank,
                 const torch::Tensor& patched, const std::vector<int64_t>& part_offsets, const std::string& isa) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "x [T, in] and y [T, out]");
  TORCH_CHECK(x.dtype() == torch::kFloat && y.dtype() == torch::kFloat && A.dtype() == torch::kFloat &&
                  B.dtype() == torch::kFloat, "lora_delta_ takes float32");
  TORCH_CHECK(A.dim() == 4 && B.dim() == 3 && A.is_contiguous() && B.is_contiguous(),
              "A [slots, parts, rank, in] and B [slots, rank, out], contiguous");
  const int64_t T = x.size(0), in = x.size(1), out = y.size(1), S = A.size(0), P = A.size(1), Rmax = A.size(2);
  TORCH_CHECK(A.size(3) == in && B.size(0) == S && B.size(1) == Rmax && B.size(2) == out, "A, B, x, y disagree");
  TORCH_CHECK(static_cast<int64_t>(part_offsets.size()) == P + 1 && part_offsets.front() == 0 &&
                  part_offsets.back() == out, "part_offsets must split the output into the parts");
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK(part_offsets[p] <= part_offsets[p + 1], "part_offsets must split the output into the parts");
  TORCH_CHECK(y.stride(1) == 1 && x.stride(1) == 1, "x and y rows must be contiguous");
  const torch::Tensor slot_t = row_slot.to(torch::kLong).contiguous();
  const torch::Tensor scale_t = row_scale.to(torch::kFloat).contiguous();
  const torch::Tensor rank_t = slot_rank.to(torch::kLong).contiguous();
  const torch::Tensor patched_t = patched.to(torch::kBool).contiguous();
  TORCH_CHECK(slot_t.numel() == T && scale_t.numel() == T && rank_t.numel() == S && patched_t.numel() == S * P,
              "one slot and scale per row, one rank per slot, one flag per slot and part");
  const int64_t* rs = slot_t.data_ptr<int64_t>();
  const float* sc = scale_t.data_ptr<float>();
  const int64_t* rk = rank_t.data_ptr<int64_t>();
  const bool* pt = patched_t.data_ptr<bool>();

  // Segments: the rows of each slot, slots ascending, rows in step order.
  std::map<int64_t, std::vector<int64_t>> by_slot;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(rs[t] < S, "row slot out of range");
    if (rs[t] >= 0) by_slot[rs[t]].push_back(t);
  }
  struct Segment {
    int64_t slot, rank;
    std::vector<int64_t> rows;
    std::vector<const float*> xs;
    std::vector<float> scales;
  };
  std::vector<Segment> segs;
  int64_t Ra = 0;
  for (auto& [s, rows] : by_slot) {
    const int64_t r = rk[s];
    TORCH_CHECK(r >= 0 && r <= Rmax, "slot rank out of range");
    bool any = false;
    for (int64_t p = 0; p < P; ++p) any = any || pt[s * P + p];
    if (r == 0 || !any) continue;
    Segment g{s, r, std::move(rows), {}, {}};
    for (int64_t t : g.rows) {
      g.xs.push_back(x.data_ptr<float>() + t * x.stride(0));
      g.scales.push_back(sc[t]);
    }
    segs.push_back(std::move(g));
    Ra = std::max(Ra, r);
  }
  if (segs.empty()) return;
  const Loops f = loops(isa);
  const float* Ap = A.data_ptr<float>();
  const float* Bp = B.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ys = y.stride(0);

  // The shrink: one item per (segment, patched part); z is [T, P, Ra].
  std::vector<float> z(static_cast<size_t>(T * P * Ra), 0.f);
  std::vector<std::pair<int64_t, int64_t>> shrinks;
  for (int64_t g = 0; g < static_cast<int64_t>(segs.size()); ++g)
    for (int64_t p = 0; p < P; ++p)
      if (pt[segs[g].slot * P + p]) shrinks.emplace_back(g, p);
  at::parallel_for(0, static_cast<int64_t>(shrinks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<const float*> as;
    std::vector<float> zs;
    for (int64_t it = begin; it < end; ++it) {
      const Segment& g = segs[shrinks[it].first];
      const int64_t p = shrinks[it].second, n = static_cast<int64_t>(g.rows.size());
      as.resize(g.rank);
      for (int64_t j = 0; j < g.rank; ++j) as[j] = Ap + ((g.slot * P + p) * Rmax + j) * in;
      zs.resize(static_cast<size_t>(n * g.rank));
      shrink(f, g.xs.data(), g.scales.data(), n, as.data(), g.rank, in, zs.data(), g.rank);
      for (int64_t i = 0; i < n; ++i)
        std::copy(zs.begin() + i * g.rank, zs.begin() + (i + 1) * g.rank, z.begin() + (g.rows[i] * P + p) * Ra);
    }
  });

  // The expand: one item per (segment, patched part, chunk of columns); each row's columns in the chunk
  // are updated by this item alone, j ascending.
  struct Expand {
    int64_t seg, part, lo, hi;
  };
  std::vector<Expand> expands;
  for (int64_t g = 0; g < static_cast<int64_t>(segs.size()); ++g)
    for (int64_t p = 0; p < P; ++p)
      if (pt[segs[g].slot * P + p])
        for (int64_t lo = part_offsets[p]; lo < part_offsets[p + 1]; lo += kColumnChunk)
          expands.push_back({g, p, lo, std::min(lo + kColumnChunk, part_offsets[p + 1])});
  at::parallel_for(0, static_cast<int64_t>(expands.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const Expand& e = expands[it];
      const Segment& g = segs[e.seg];
      for (int64_t j = 0; j < g.rank; ++j) {
        const float* b = Bp + (g.slot * Rmax + j) * out + e.lo;
        for (int64_t t : g.rows) f.axpy(yp + t * ys + e.lo, z[(t * P + e.part) * Ra + j], b, e.hi - e.lo);
      }
    }
  });
}
