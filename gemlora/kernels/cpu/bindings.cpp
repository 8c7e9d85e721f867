// The Python module of the CPU kernels. They run without the GIL, as torch's own ops do: a server's
// asyncio thread keeps serving while the engine thread multiplies.

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("qmatmul", &qmatmul, "quantized x @ W^T", release());
  m.def("quantize_activations", &quantize_activations, "int8 or int16 activations in blocks of 32", pybind11::arg("x"),
        pybind11::arg("activations"), pybind11::arg("isa") = "auto", release());
  m.def("qmatmul_rows", &qmatmul_rows, "chosen entries of a quantized x @ W^T, as the reference computes them",
        release());
  m.def("dequantize_rows", &dequantize_rows, "rows of a packed quantized matrix, as float32", release());
  m.def("decode_attention", &decode_attention, "one query per row over a paged KV cache", pybind11::arg("q"),
        pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("blocks"), pybind11::arg("mask"),
        pybind11::arg("scale"), pybind11::arg("softcap"), pybind11::arg("isa") = "auto", release());
  m.def("lora_delta_", &lora_delta_, "a step's LoRA deltas added in place, segmented by adapter", pybind11::arg("y"),
        pybind11::arg("x"), pybind11::arg("A"), pybind11::arg("B"), pybind11::arg("row_slot"),
        pybind11::arg("row_scale"), pybind11::arg("slot_rank"), pybind11::arg("patched"),
        pybind11::arg("part_offsets"), pybind11::arg("isa") = "auto", release());
  m.def("norm_rope", &norm_rope, "rotary embedding after an optional per-head RMSNorm", release());
  m.def("rms_norm", &rms_norm, "RMSNorm of float32 rows", release());
  m.def("apply_token_bitmask", &apply_token_bitmask, "a grammar's token bitmask applied to logits rows in place",
        pybind11::arg("logits"), pybind11::arg("mask"), pybind11::arg("rows"), pybind11::arg("isa") = "auto",
        release());
  m.def("top_k_ids", &top_k_ids, "indices of each row's k largest values, unordered", release());
  m.def("place_top", &place_top, "a row's top entries set, the rest kept below them (in place)", release());
  m.def("cpu_isa", &cpu_isa, "the best kernel path this CPU runs");
  bind_decode_stack(m);
}
