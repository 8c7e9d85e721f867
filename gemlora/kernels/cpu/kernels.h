// The CPU kernels' entry points (bindings.cpp exposes them to Python).
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

// qmatmul.cpp: quantized x @ W^T with activations quantized as "int8", "int8x2" or "int16"
torch::Tensor qmatmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                      const c10::optional<torch::Tensor>& bias, int64_t n, int64_t k, int64_t bits, int64_t group,
                      int64_t offset, const std::string& activations, const std::string& isa);
torch::Tensor dequantize_rows(const torch::Tensor& ids, const torch::Tensor& packed, const torch::Tensor& scales,
                              const c10::optional<torch::Tensor>& bias, int64_t n, int64_t k, int64_t bits,
                              int64_t group, int64_t offset);
// y[m, j] = W[ids[m, j]] . x[m], as the reference computes it (float64 sums of the dequantized operands)
torch::Tensor qmatmul_rows(const torch::Tensor& x, const torch::Tensor& ids, const torch::Tensor& packed,
                           const torch::Tensor& scales, const c10::optional<torch::Tensor>& bias, int64_t n,
                           int64_t k, int64_t bits, int64_t group, int64_t offset, const std::string& activations);
std::string cpu_isa();

// activations.cpp: the activation quantization alone, on one vector path (for the tests)
std::vector<torch::Tensor> quantize_activations(const torch::Tensor& x, const std::string& activations,
                                                const std::string& isa = "auto");

// lora.cpp: y[t] += the LoRA delta of row t's adapter slot (row_slot[t] < 0: none), segmented by slot,
// each at its own rank; A [slots, parts, max_rank, in], B [slots, max_rank, out] (in place)
void lora_delta_(torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& A, const torch::Tensor& B,
                 const torch::Tensor& row_slot, const torch::Tensor& row_scale, const torch::Tensor& slot_rank,
                 const torch::Tensor& patched, const std::vector<int64_t>& part_offsets,
                 const std::string& isa = "auto");

// rmsnorm.cpp: y = x / sqrt(mean(x^2) + eps) * scale, float32 rows
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& scale, double eps);

// attention.cpp: one query per row over a paged float32 KV cache (blocks, mask, soft-cap)
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& blocks, const torch::Tensor& mask, double scale, double softcap,
                               const std::string& isa = "auto");

// decode_stack.cpp: every decoder layer of a decode-only step in one call (classes DecodeStack, StackMatrix)
void bind_decode_stack(pybind11::module& m);

// rope.cpp: rotate-half rotary embedding of float32 [T, heads, D], after an optional per-head RMSNorm
torch::Tensor norm_rope(const torch::Tensor& x, const c10::optional<torch::Tensor>& scale, double eps,
                        const torch::Tensor& cos, const torch::Tensor& sin);

// token_mask.cpp: logits[rows[j], v] = -inf where bit v of mask row j (int32 words) is 0 (in place)
void apply_token_bitmask(torch::Tensor& logits, const torch::Tensor& mask, const torch::Tensor& rows,
                         const std::string& isa);

// top_k.cpp: the indices of the k largest values of each float32 row [M, N] -> int64 [M, k], unordered;
// and those entries replaced by `values` [M, k], every other entry lowered below the row's least value
torch::Tensor top_k_ids(const torch::Tensor& logits, int64_t k);
void place_top(torch::Tensor& logits, const torch::Tensor& ids, const torch::Tensor& values);
