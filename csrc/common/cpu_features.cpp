// Run-time CPU feature detection (cpuid + XGETBV + the Linux AMX permission) and ISA selection.
//
// NOTE: feature bits alone are not enough. AVX/AVX-512/AMX state must also be enabled by the OS
// (XCR0), and on Linux a process must ask for the AMX tile-data state with arch_prctl before its
// first tile instruction, or that instruction faults.
#include "common/isa.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <mutex>
#include <stdexcept>

namespace ktrans {
namespace {

uint64_t read_xcr0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

bool request_amx_permission() {
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  f.fma = c & (1u << 12);
  f.avx = c & (1u << 28);
  f.f16c = c & (1u << 29);
  bool osxsave = c & (1u << 27);
  uint64_t xcr0 = osxsave ? read_xcr0() : 0;
  f.os_avx = (xcr0 & 0x6) == 0x6;
  f.os_avx512 = f.os_avx && (xcr0 & 0xE0) == 0xE0;
  f.os_amx = (xcr0 & (3ull << 17)) == (3ull << 17);
  if (__get_cpuid_max(0, nullptr) >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    f.avx2 = b & (1u << 5);
    f.bmi2 = b & (1u << 8);
    f.avx512f = b & (1u << 16);
    f.avx512dq = b & (1u << 17);
    f.avx512bw = b & (1u << 30);
    f.avx512vl = b & (1u << 31);
    f.avx512_vnni = c & (1u << 11);
    f.avx512_fp16 = d & (1u << 23);
    f.amx_bf16 = d & (1u << 22);
    f.amx_tile = d & (1u << 24);
    f.amx_int8 = d & (1u << 25);
    __cpuid_count(7, 1, a, b, c, d);
    f.avx512_bf16 = a & (1u << 5);
  }
  if (f.amx_tile && f.os_amx) f.amx_permitted = request_amx_permission();
  return f;
}

Isa detect_best(const CpuFeatures& f) {
  bool avx2 = f.os_avx && f.avx2 && f.fma && f.f16c && f.bmi2;
  bool avx512 = avx2 && f.os_avx512 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq &&
                f.avx512_vnni;
  bool amx = avx512 && f.avx512_bf16 && f.amx_tile && f.amx_bf16 && f.amx_int8 && f.amx_permitted;
  return amx ? Isa::amx : avx512 ? Isa::avx512 : avx2 ? Isa::avx2 : Isa::generic;
}

std::atomic<int> g_selected{-1};
std::once_flag g_init_once;

void init_selection() {
  Isa best = best_isa();
  Isa isa = best;
  if (const char* env = std::getenv("KTRANS_ISA"); env && *env) {
    Isa wanted;
    try {
      wanted = parse_isa(env);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(std::string("KTRANS_ISA: ") + e.what());
    }
    // NOTE: the variable can only lower the level; asking for more than the CPU has is an error
    // rather than a crash on the first unsupported instruction.
    if (static_cast<int>(wanted) > static_cast<int>(best))
      throw std::invalid_argument(std::string("KTRANS_ISA=") + env + " is not supported by this CPU (best: " +
                                  isa_name(best) + ")");
    isa = wanted;
  }
  g_selected.store(static_cast<int>(isa));
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::generic: return "generic";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::amx: return "amx";
  }
  return "unknown";
}

Isa parse_isa(const std::string& name) {
  for (int i = 0; i < kNumIsa; ++i)
    if (name == isa_name(static_cast<Isa>(i))) return static_cast<Isa>(i);
  throw std::invalid_argument("unknown ISA '" + name + "'; expected one of: generic, avx2, avx512, amx");
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

Isa best_isa() {
  static const Isa best = detect_best(cpu_features());
  return best;
}

Isa selected_isa() {
  int v = g_selected.load(std::memory_order_relaxed);
  if (v < 0) {
    std::call_once(g_init_once, init_selection);
    v = g_selected.load();
  }
  return static_cast<Isa>(v);
}

void set_isa(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(best_isa()))
    throw std::invalid_argument(std::string("ISA '") + isa_name(isa) + "' is not supported by this CPU (best: " +
                                isa_name(best_isa()) + ")");
  std::call_once(g_init_once, [] {});
  g_selected.store(static_cast<int>(isa));
}

}  // namespace ktrans
