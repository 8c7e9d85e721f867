// The vector paths of the quantized matmul and the activation quantizer, and which one this CPU runs
// (detected once, at first use). Knows CPU features only.
#pragma once

#include <c10/util/Exception.h>

#include <string>

namespace gemlora {

enum class Isa { kScalar, kAvx2, kAvx512Vnni };

inline Isa best_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
      return Isa::kAvx512Vnni;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return Isa::kAvx2;
    return Isa::kScalar;
  }();
  return isa;
}

// "auto" (the best), "avx512_vnni", "avx2" or "scalar"; a path this CPU lacks is refused
inline Isa parse_isa(const std::string& name) {
  if (name == "auto") return best_isa();
  TORCH_CHECK(name == "avx512_vnni" || name == "avx2" || name == "scalar", "unknown isa ", name);
  const Isa want = name == "avx512_vnni" ? Isa::kAvx512Vnni : name == "avx2" ? Isa::kAvx2 : Isa::kScalar;
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best_isa()), "this CPU cannot run the ", name, " path");
  return want;
}

inline std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace gemlora
