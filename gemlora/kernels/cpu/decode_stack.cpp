// Every decoder layer of a decode step in one call: the same kernels, in the same order, on the same
// tensor layouts as the model's Python layers (gemlora/model/gemma.py), so the result is equal bit for
// bit; only the Python between them is gone.
//
// What it replaces: per layer and token, ~25 Python-level calls (modules, views, norms, the kernels'
// wrappers): about a fifth of a batch-1 decode step of the 270M model, whose layers are small.
//
// Per layer, for x [B, hidden] float32, one query per row (decodes only):
//   h = rms(x) ; q|k|v = h W_qkv ; q, k = norm_rope(q), norm_rope(k) ; K/V written at the rows' slots
//   a = decode_attention(q) W_o
//   sandwich (Gemma 2/3): x += rms(a) ; h = rms(x)      else (Gemma 1): x += a ; h = rms(x)
//   g|u = h W_gate_up ; m = (gelu_tanh(g) * u) W_down ; x += sandwich ? rms(m) : m
// With adapters in the step, every projection's output then takes its LoRA delta from lora_delta_
// (lora.cpp), the call the Python layers make, on the adapter slots' tensors (attached once).

#include "kernels.h"

#include <torch/extension.h>

#include <memory>
#include <string>
#include <vector>

namespace {

// One matrix of a projection: packed codes for qmatmul, or a dense weight for at::linear.
struct Matrix {
  torch::Tensor packed, scales, dense;
  c10::optional<torch::Tensor> bias;
  int64_t n = 0, k = 0, bits = 0, group = 0, offset = 0;
  std::string activations;

  torch::Tensor operator()(const torch::Tensor& x) const {
    if (dense.defined()) return at::linear(x, dense);
    return qmatmul(x, packed, scales, bias, n, k, bits, group, offset, activations, "auto");
  }
};

// The parts of one projection (q|k|v or gate|up may come in different formats): outputs concatenated,
// as gemlora.quant.weight.QuantWeight does.
torch::Tensor project(const std::vector<Matrix>& parts, const torch::Tensor& x) {
  if (parts.size() == 1) return parts[0](x);
  std::vector<torch::Tensor> outs;
  for (const Matrix& m : parts) outs.push_back(m(x));
  return at::cat(outs, -1);
}

// One projection's adapter slots (gemlora.lora.slots.LoRASlots): A, B, which parts each slot patches.
struct LoraSlots {
  torch::Tensor A, B, patched;
  std::vector<int64_t> offsets;
};

// The step's adapter layout (gemlora.lora.batch.LoRABatch): each row's slot and scale, each slot's rank.
struct StepLora {
  const torch::Tensor &row_slot, &row_scale, &slot_rank;
};

torch::Tensor with_lora(torch::Tensor y, const torch::Tensor& x, const LoraSlots& l, const StepLora* step) {
  if (step != nullptr)
    lora_delta_(y, x, l.A, l.B, step->row_slot, step->row_scale, step->slot_rank, l.patched, l.offsets);
  return y;
}

struct Layer {
  std::vector<Matrix> qkv, o, gate_up, down;
  LoraSlots qkv_lora, o_lora, gate_up_lora, down_lora;   // set by attach_lora
  torch::Tensor input_norm, post_attention_norm, pre_feedforward_norm, post_feedforward_norm;   // 1 + w
  c10::optional<torch::Tensor> q_norm, k_norm;
  bool sliding = false;
};

}  // namespace

class DecodeStack {
 public:
  DecodeStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double attn_scale,
              double softcap, bool sandwich)
      : H_(num_heads), KVH_(num_kv_heads), D_(head_dim), eps_(eps), scale_(attn_scale), softcap_(softcap),
        sandwich_(sandwich) {}

  void add_layer(std::vector<Matrix> qkv, std::vector<Matrix> o, std::vector<Matrix> gate_up,
                 std::vector<Matrix> down, std::vector<torch::Tensor> norms, c10::optional<torch::Tensor> q_norm,
                 c10::optional<torch::Tensor> k_norm, bool sliding) {
    TORCH_CHECK(norms.size() == (sandwich_ ? 4u : 2u), "a layer has 4 norms with sandwich norms, else 2");
    Layer l;
    l.qkv = std::move(qkv);
    l.o = std::move(o);
    l.gate_up = std::move(gate_up);
    l.down = std::move(down);
    l.input_norm = norms[0];
    l.post_attention_norm = norms[1];
    if (sandwich_) {
      l.pre_feedforward_norm = norms[2];
      l.post_feedforward_norm = norms[3];
    }
    l.q_norm = std::move(q_norm);
    l.k_norm = std::move(k_norm);
    l.sliding = sliding;
    layers_.push_back(std::move(l));
  }

  // Layer i's adapter slots, per projection (qkv, o, gate_up, down): A, B, patched and part offsets.
  void attach_lora(int64_t i, const std::vector<torch::Tensor>& A, const std::vector<torch::Tensor>& B,
                   const std::vector<torch::Tensor>& patched, const std::vector<std::vector<int64_t>>& offsets) {
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(layers_.size()), "no layer ", i);
    TORCH_CHECK(A.size() == 4 && B.size() == 4 && patched.size() == 4 && offsets.size() == 4,
                "one entry per projection: qkv, o, gate_up, down");
    Layer& l = layers_[i];
    LoraSlots* targets[4] = {&l.qkv_lora, &l.o_lora, &l.gate_up_lora, &l.down_lora};
    for (int j = 0; j < 4; ++j) *targets[j] = LoraSlots{A[j], B[j], patched[j], offsets[j]};
    lora_attached_ = true;
  }

  // x [B, hidden]; kv: K0, V0, K1, V1, ... ; slots [B]; per plan (global, sliding) each row's blocks
  // [B * n] and mask [B, n * block]; cos/sin per plan [B, 1, D]; with adapters in the step, each row's
  // slot (-1: none) and scale, and each slot's rank. Returns the last layer's output.
  torch::Tensor forward(torch::Tensor x, const std::vector<torch::Tensor>& kv, const torch::Tensor& slots,
                        const torch::Tensor& global_blocks, const torch::Tensor& global_mask,
                        const torch::Tensor& sliding_blocks, const torch::Tensor& sliding_mask,
                        const torch::Tensor& global_cos, const torch::Tensor& global_sin,
                        const torch::Tensor& sliding_cos, const torch::Tensor& sliding_sin,
                        const c10::optional<torch::Tensor>& row_slot, const c10::optional<torch::Tensor>& row_scale,
                        const c10::optional<torch::Tensor>& slot_rank) const {
    TORCH_CHECK(kv.size() == 2 * layers_.size(), "one K and one V cache per layer");
    TORCH_CHECK(row_slot.has_value() == row_scale.has_value() && row_slot.has_value() == slot_rank.has_value(),
                "row_slot, row_scale and slot_rank come together");
    TORCH_CHECK(!row_slot.has_value() || lora_attached_, "a step with adapters needs attach_lora first");
    std::unique_ptr<StepLora> lora_holder;
    if (row_slot.has_value()) lora_holder.reset(new StepLora{*row_slot, *row_scale, *slot_rank});
    const StepLora* lora = lora_holder.get();
    TORCH_CHECK(x.dim() == 2 && x.dtype() == torch::kFloat, "x must be float32 [B, hidden]");
    const int64_t B = x.size(0), q_size = H_ * D_, kv_size = KVH_ * D_;
    const c10::optional<torch::Tensor> none;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      const torch::Tensor& kc = kv[2 * i];
      const torch::Tensor& vc = kv[2 * i + 1];
      const torch::Tensor hin = rms_norm(x, l.input_norm, eps_);
      const torch::Tensor qkv = with_lora(project(l.qkv, hin), hin, l.qkv_lora, lora);
      const torch::Tensor q = qkv.narrow(1, 0, q_size).view({B, H_, D_});
      const torch::Tensor k = qkv.narrow(1, q_size, kv_size).view({B, KVH_, D_});
      const torch::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({B, KVH_, D_});
      const torch::Tensor& cos = l.sliding ? sliding_cos : global_cos;
      const torch::Tensor& sin = l.sliding ? sliding_sin : global_sin;
      const torch::Tensor qr = norm_rope(q, l.q_norm, eps_, cos, sin);
      const torch::Tensor kr = norm_rope(k, l.k_norm, eps_, cos, sin);
      kc.view({-1, KVH_, D_}).index_copy_(0, slots, kr);
      vc.view({-1, KVH_, D_}).index_copy_(0, slots, v);
      const torch::Tensor attn = decode_attention(qr, kc, vc, l.sliding ? sliding_blocks : global_blocks,
                                                  (l.sliding ? sliding_mask : global_mask).view({B, -1}), scale_,
                                                  softcap_, "auto");
      const torch::Tensor a = with_lora(project(l.o, attn), attn, l.o_lora, lora);
      torch::Tensor h;
      if (sandwich_) {
        x = x + rms_norm(a, l.post_attention_norm, eps_);
        h = rms_norm(x, l.pre_feedforward_norm, eps_);
      } else {
        x = x + a;
        h = rms_norm(x, l.post_attention_norm, eps_);
      }
      const std::vector<torch::Tensor> gu = with_lora(project(l.gate_up, h), h, l.gate_up_lora, lora).chunk(2, -1);
      const torch::Tensor act = at::gelu(gu[0], "tanh") * gu[1];
      const torch::Tensor m = with_lora(project(l.down, act), act, l.down_lora, lora);
      x = sandwich_ ? x + rms_norm(m, l.post_feedforward_norm, eps_) : x + m;
    }
    return x;
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  int64_t H_, KVH_, D_;
  double eps_, scale_, softcap_;
  bool sandwich_;
  bool lora_attached_ = false;
  std::vector<Layer> layers_;
};

void bind_decode_stack(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<Matrix>(m, "StackMatrix")
      .def(py::init([](torch::Tensor packed, torch::Tensor scales, c10::optional<torch::Tensor> bias, int64_t n,
                       int64_t k, int64_t bits, int64_t group, int64_t offset, std::string activations) {
             Matrix mat;
             mat.packed = packed;
             mat.scales = scales;
             mat.bias = bias;
             mat.n = n;
             mat.k = k;
             mat.bits = bits;
             mat.group = group;
             mat.offset = offset;
             mat.activations = std::move(activations);
             return mat;
           }))
      .def_static("dense", [](torch::Tensor weight) {
        Matrix mat;
        mat.dense = weight;
        mat.n = weight.size(0);
        mat.k = weight.size(1);
        return mat;
      });
  using release = py::call_guard<py::gil_scoped_release>;
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<int64_t, int64_t, int64_t, double, double, double, bool>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("attach_lora", &DecodeStack::attach_lora)
      .def("forward", &DecodeStack::forward, release())
      .def_property_readonly("num_layers", &DecodeStack::num_layers);
}
