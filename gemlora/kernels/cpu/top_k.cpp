// The indices of the k largest values of each float32 row, in no particular order: what the screened
// LM head needs of its 262k coarse logits per row (gemlora/quant/screened_head.py), in a fraction of
// torch.topk's time (which heap-selects over the whole row).
//
// Per row: the maxima of blocks of 64 values; T = the k-th largest of those maxima. At least k values
// are >= T (each of k blocks holds one), and every value among the k largest is >= T (else k blocks'
// maxima, all >= T, would beat it). So the k largest are the k largest of the values >= T, which are
// found by scanning only the blocks whose maximum reaches T: a pass over the row at memory speed, a
// partial sort of a few thousand maxima and of the (typically few hundred) values above T.
// Ties at the k-th value are broken arbitrarily, as torch.topk's are. NaN is not expected (logits).
//
// place_top then writes a row's k chosen entries (their exact values, from elsewhere) and lowers every
// other entry to below the least of them, in one pass: the row's top k are then those entries.

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;

void row_top_k(const float* x, int64_t n, int64_t k, int64_t* out) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<std::pair<float, int64_t>> picked;
  if (blocks <= k) {                 // short rows: every value is a candidate
    picked.reserve(n);
    for (int64_t i = 0; i < n; ++i) picked.emplace_back(x[i], i);
  } else {
    std::vector<float> maxima(blocks);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
      float m = x[lo];
      for (int64_t i = lo + 1; i < hi; ++i) m = x[i] > m ? x[i] : m;
      maxima[b] = m;
    }
    std::vector<float> order(maxima);
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), std::greater<float>());
    const float threshold = order[k - 1];
    picked.reserve(4 * k);
    for (int64_t b = 0; b < blocks; ++b) {
      if (maxima[b] < threshold) continue;
      const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
      for (int64_t i = lo; i < hi; ++i)
        if (x[i] >= threshold) picked.emplace_back(x[i], i);
    }
  }
  auto larger = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) { return a.first > b.first; };
  if (static_cast<int64_t>(picked.size()) > k) std::nth_element(picked.begin(), picked.begin() + (k - 1), picked.end(), larger);
  for (int64_t j = 0; j < k; ++j) out[j] = picked[j].second;
}

}  // namespace

torch::Tensor top_k_ids(const torch::Tensor& logits, int64_t k) {
  TORCH_CHECK(logits.dim() == 2 && logits.dtype() == torch::kFloat, "logits must be float32 [M, N]");
  const torch::Tensor x = logits.contiguous();
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK(k >= 1 && k <= N, "k must be in [1, ", N, "], got ", k);
  torch::Tensor out = torch::empty({M, k}, torch::TensorOptions().dtype(torch::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) row_top_k(xp + m * N, N, k, op + m * k);
  });
  return out;
}

void place_top(torch::Tensor& logits, const torch::Tensor& ids, const torch::Tensor& values) {
  TORCH_CHECK(logits.dim() == 2 && logits.dtype() == torch::kFloat && logits.is_contiguous(),
              "logits must be contiguous float32 [M, N]");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == logits.size(0) && ids.dtype() == torch::kLong && ids.is_contiguous(),
              "ids must be contiguous int64 [M, k]");
  TORCH_CHECK(values.sizes() == ids.sizes() && values.dtype() == torch::kFloat && values.is_contiguous(),
              "values must be contiguous float32 like ids");
  const int64_t M = logits.size(0), N = logits.size(1), k = ids.size(1);
  float* x = logits.data_ptr<float>();
  const int64_t* idp = ids.data_ptr<int64_t>();
  const float* vp = values.data_ptr<float>();
  for (int64_t i = 0; i < M * k; ++i) TORCH_CHECK(idp[i] >= 0 && idp[i] < N, "id ", idp[i], " out of range");
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      float* row = x + m * N;
      const float* v = vp + m * k;
      const float floor = std::nextafter(*std::min_element(v, v + k), -std::numeric_limits<float>::infinity());
      for (int64_t i = 0; i < N; ++i) row[i] = row[i] < floor ? row[i] : floor;
      for (int64_t j = 0; j < k; ++j) row[idp[m * k + j]] = v[j];
    }
  });
}
