// ISA levels, run-time CPU feature detection and the per-kernel dispatch slots.
//
// Every kernel is a `Kernel<Fn>` slot: the generic scalar reference fills `impl[generic]`, and
// ISA-specific files register overrides for higher levels from static initializers. A call picks
// the highest registered implementation not above the selected level, so a kernel that has no
// AVX-512 version simply runs its AVX2 one on an AVX-512 machine.
//
// ISA files raise the compiler target for their own code only, between
// KTRANS_TARGET_<ISA>_BEGIN and KTRANS_TARGET_END, *after* all #includes. This keeps standard
// library templates and shared inline helpers at the baseline ISA (no ODR copies with AVX-512
// instructions that an AVX2 machine could end up executing).
// NOTE: each _Pragma takes ONE string literal (no concatenation), hence the long lines.
#pragma once
#include <atomic>
#include <cstdint>
#include <string>

namespace ktrans {

enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2, amx = 3 };
constexpr int kNumIsa = 4;

const char* isa_name(Isa isa);
// Parses "generic" / "avx2" / "avx512" / "amx"; throws std::invalid_argument naming the valid ones.
Isa parse_isa(const std::string& name);

struct CpuFeatures {
  bool avx = false, avx2 = false, fma = false, f16c = false, bmi2 = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_vnni = false, avx512_bf16 = false, avx512_fp16 = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  bool os_avx = false, os_avx512 = false, os_amx = false;  // XCR0 state enabled by the kernel
  bool amx_permitted = false;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) succeeded
};

const CpuFeatures& cpu_features();
// Highest level this CPU and OS support.
Isa best_isa();
// Level in use: best_isa(), lowered by KTRANS_ISA at first use or by set_isa().
Isa selected_isa();
// Force a level (tests, users hit by a bad kernel). Throws if the CPU does not support it.
void set_isa(Isa isa);

template <class Fn>
struct Kernel {
  const char* name;
  Fn impl[kNumIsa];

  // Implementation for the selected level (or an explicit one), falling back downward.
  Fn get() const { return get(selected_isa()); }
  Fn get(Isa isa) const {
    for (int i = static_cast<int>(isa); i >= 0; --i)
      if (impl[i]) return impl[i];
    return nullptr;
  }
  // Level that get(isa) would actually run.
  Isa resolved(Isa isa) const {
    for (int i = static_cast<int>(isa); i >= 0; --i)
      if (impl[i]) return static_cast<Isa>(i);
    return Isa::generic;
  }
};

// Registers an ISA override from a static initializer in the ISA's own file.
template <class Fn>
struct RegisterKernel {
  RegisterKernel(Kernel<Fn>& k, Isa isa, Fn fn) { k.impl[static_cast<int>(isa)] = fn; }
};

}  // namespace ktrans

#if defined(__clang__)
#define KTRANS_TARGET_AVX2_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c,bmi,bmi2,popcnt\"))), apply_to = function)")
#define KTRANS_TARGET_AVX512_BEGIN                                                                \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c,bmi,bmi2,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni\"))), apply_to = function)")
#define KTRANS_TARGET_AMX_BEGIN                                                                   \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c,bmi,bmi2,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,amx-tile,amx-bf16,amx-int8\"))), apply_to = function)")
#define KTRANS_TARGET_END _Pragma("clang attribute pop")
#else
#define KTRANS_TARGET_AVX2_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c,bmi,bmi2,popcnt\")")
#define KTRANS_TARGET_AVX512_BEGIN    \
  _Pragma("GCC push_options")         \
  _Pragma("GCC target(\"avx2,fma,f16c,bmi,bmi2,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni\")")
#define KTRANS_TARGET_AMX_BEGIN                                                                  \
  _Pragma("GCC push_options")                                                                    \
  _Pragma("GCC target(\"avx2,fma,f16c,bmi,bmi2,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,amx-tile,amx-bf16,amx-int8\")")
#define KTRANS_TARGET_END _Pragma("GCC pop_options")
#endif
