// A grammar's token bitmask applied to float32 logits in place: logits[rows[j], v] = -inf where bit v of
// mask row j (int32 words, bit v % 32 of word v / 32, as llguidance and xgrammar fill them) is 0.
// Tokens past the mask's last word are disallowed too.
//
// Why a kernel: unpacking 262k bits per row in torch and masked_fill-ing costs ~0.7 ms per row here
// (about 25 ms for 32 constrained rows, a quarter of a decode step), and gathering the constrained rows
// out of the step's logits and back costs as much again; this one writes the given rows where they lie.
// JSON grammars leave most words all-0 or all-1: an all-1 word is skipped, and the vector paths write
// -inf into a word's 32 logits with masked stores (16 or 8 lanes at a time) instead of a bit loop.

#include "isa.h"
#include "kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <limits>

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// logits [0, vocab) of one row under its mask words; `full` words hold 32 tokens each
void row_scalar(float* row, const uint32_t* m, int64_t words, int64_t vocab) {
  for (int64_t w = 0; w * 32 < vocab; ++w) {
    const uint32_t bits = w < words ? m[w] : 0u;
    if (bits == 0xFFFFFFFFu) continue;
    const int64_t v0 = w * 32, n = std::min<int64_t>(32, vocab - v0);
    for (int64_t i = 0; i < n; ++i)
      if (!((bits >> i) & 1u)) row[v0 + i] = kNegInf;
  }
}

__attribute__((target("avx512f")))
void row_avx512(float* row, const uint32_t* m, int64_t words, int64_t vocab) {
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  const int64_t full = std::min<int64_t>(words, vocab / 32);   // words whose 32 tokens all exist
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t off = ~m[w];
    if (off == 0) continue;
    _mm512_mask_storeu_ps(row + w * 32, static_cast<__mmask16>(off), ninf);
    _mm512_mask_storeu_ps(row + w * 32 + 16, static_cast<__mmask16>(off >> 16), ninf);
  }
  row_scalar(row + full * 32, m + full, words - full, vocab - full * 32);
}

__attribute__((target("avx2")))
void row_avx2(float* row, const uint32_t* m, int64_t words, int64_t vocab) {
  const __m256 ninf = _mm256_set1_ps(kNegInf);
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const int64_t full = std::min<int64_t>(words, vocab / 32);
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t bits = m[w];
    if (bits == 0xFFFFFFFFu) continue;
    for (int q = 0; q < 4; ++q) {            // 8 tokens per store: a lane is written where its bit is 0
      const __m256i b = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>((bits >> (8 * q)) & 0xFFu)), lane_bit);
      _mm256_maskstore_ps(row + w * 32 + 8 * q, _mm256_cmpeq_epi32(b, _mm256_setzero_si256()), ninf);
    }
  }
  row_scalar(row + full * 32, m + full, words - full, vocab - full * 32);
}

}  // namespace

void apply_token_bitmask(torch::Tensor& logits, const torch::Tensor& mask_in, const torch::Tensor& rows_in,
                         const std::string& isa_name) {
  TORCH_CHECK(logits.dtype() == torch::kFloat && logits.dim() == 2 && logits.stride(1) == 1,
              "logits must be float32 [rows, vocab] with contiguous rows");
  TORCH_CHECK(mask_in.dtype() == torch::kInt && mask_in.dim() == 2, "the mask must be int32 [rows, words]");
  TORCH_CHECK(rows_in.dtype() == torch::kLong && rows_in.dim() == 1 && rows_in.size(0) == mask_in.size(0),
              "rows must be int64 [mask rows]: the logits row of each mask row");
  const torch::Tensor mask = mask_in.contiguous(), rows = rows_in.contiguous();
  const int64_t n = mask.size(0), vocab = logits.size(1), words = mask.size(1), stride = logits.stride(0);
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j)
    TORCH_CHECK(rp[j] >= 0 && rp[j] < logits.size(0), "row ", rp[j], " is outside the logits");
  const gemlora::Isa isa = gemlora::parse_isa(isa_name);
  const auto row_fn = isa == gemlora::Isa::kAvx512Vnni ? row_avx512 : isa == gemlora::Isa::kAvx2 ? row_avx2 : row_scalar;
  float* lp = logits.data_ptr<float>();
  const uint32_t* mp = reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>());
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) row_fn(lp + rp[j] * stride, mp + j * words, words, vocab);
  });
}
