// The CPU kernels' entry points (bindings.cpp exposes them to Python).
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

// qmatmul.cpp: quantized x @ W^T with int8 activations (one or two passes)
torch::Tensor qmatmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                      const c10::optional<torch::Tensor>& bias, int64_t n, int64_t k, int64_t bits, int64_t group,
                      int64_t offset, int64_t passes, const std::string& isa);
std::vector<torch::Tensor> quantize_activations(const torch::Tensor& x, int64_t passes);
torch::Tensor dequantize_rows(const torch::Tensor& ids, const torch::Tensor& packed, const torch::Tensor& scales,
                              const c10::optional<torch::Tensor>& bias, int64_t n, int64_t k, int64_t bits,
                              int64_t group, int64_t offset);
std::string cpu_isa();

// rmsnorm.cpp: y = x / sqrt(mean(x^2) + eps) * scale, float32 rows
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& scale, double eps);
