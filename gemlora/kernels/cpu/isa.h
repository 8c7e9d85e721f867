// The vector paths of the kernels, and which one this CPU runs (detected once, at first use, and capped
// by GEMLORA_CPU_ISA). Knows CPU features only.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace gemlora {

enum class Isa { kScalar, kAvx2, kAvx512Vnni };

// GEMLORA_CPU_ISA=avx2|scalar caps every kernel at that path, as ATEN_CPU_CAPABILITY caps torch's own:
// to run an AVX2-only CPU's code on a wider one (measuring, debugging). Unset, empty or "auto": no cap.
inline Isa isa_cap() {
  static const Isa cap = [] {
    const char* env = std::getenv("GEMLORA_CPU_ISA");
    const std::string name = env ? env : "";
    if (name.empty() || name == "auto" || name == "avx512_vnni") return Isa::kAvx512Vnni;
    if (name == "avx2") return Isa::kAvx2;
    TORCH_CHECK(name == "scalar", "GEMLORA_CPU_ISA must be auto, avx512_vnni, avx2 or scalar, not ", name);
    return Isa::kScalar;
  }();
  return cap;
}

inline bool isa_allowed(Isa isa) { return static_cast<int>(isa) <= static_cast<int>(isa_cap()); }

inline Isa best_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (isa_allowed(Isa::kAvx512Vnni) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
      return Isa::kAvx512Vnni;
    if (isa_allowed(Isa::kAvx2) && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
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
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best_isa()), "this CPU (or GEMLORA_CPU_ISA) cannot run the ", name, " path");
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
