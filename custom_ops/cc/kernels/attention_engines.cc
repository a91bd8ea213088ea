#include "custom_ops/cc/kernels/attention_engines.h"

#include <cpuid.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace sparse_attention {
namespace {

// The engines in order, lowest first: $SPARSE_ATTENTION_TF_ISA names a cap.
enum Level { kBaseline, kAvx2, kAvx512, kAvx512Bf16, kAmx, kLevels };
const char* const kNames[kLevels] = {"baseline", "avx2", "avx512", "avx512_bf16", "amx"};
constexpr char kEmulated[] = "amx_emulated";

// AMX-TILE and AMX-BF16 in CPUID leaf 7 (EDX bits 24 and 22).
bool CpuHasAmx() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  return (edx >> 24 & 1) && (edx >> 22 & 1);
}

// Which levels this CPU (and, for AMX, the kernel) runs.
std::vector<bool> Available(bool* cpu_amx) {
  __builtin_cpu_init();
  std::vector<bool> has(kLevels, false);
  has[kBaseline] = true;
  has[kAvx2] = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  has[kAvx512] = has[kAvx2] && __builtin_cpu_supports("avx512f") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512dq");
  has[kAvx512Bf16] = has[kAvx512] && __builtin_cpu_supports("avx512bf16");
  *cpu_amx = CpuHasAmx();
  // The AMX engine's conversions and packing use AVX512_BF16 (every AMX CPU
  // has it); the tile state must be granted by the kernel.
  has[kAmx] = *cpu_amx && has[kAvx512Bf16] && RequestAmxTileState();
  return has;
}

CpuDispatch Select() {
  CpuDispatch d;
  bool cpu_amx = false;
  const std::vector<bool> has = Available(&cpu_amx);
  for (int l = kLevels - 1; l >= 0; --l)
    if (has[l]) d.available += std::string(d.available.empty() ? "" : ", ") + kNames[l];
  d.available += std::string(", ") + kEmulated;
  const char* env = std::getenv("SPARSE_ATTENTION_TF_ISA");
  d.requested = env ? env : "";
  int cap = kLevels - 1;
  bool emulated = false;
  if (d.requested == kEmulated) {
    emulated = true;
  } else if (!d.requested.empty()) {
    cap = -1;
    for (int l = 0; l < kLevels; ++l)
      if (d.requested == kNames[l]) cap = l;
    if (cap < 0) {
      d.error = "SPARSE_ATTENTION_TF_ISA=" + d.requested +
                " names no CPU engine: use one of amx, avx512_bf16, avx512, avx2, baseline, " +
                kEmulated + " (tests only), or leave it unset";
      cap = kLevels - 1;
    } else if (!has[cap]) {
      d.error = "SPARSE_ATTENTION_TF_ISA=" + d.requested + " asks for the " + kNames[cap] +
                " engine, which this CPU does not run (it runs: " + d.available + ")";
      if (cap == kAmx && cpu_amx)
        d.error += "; the CPU has AMX, but the kernel refused the tile state "
                   "(arch_prctl ARCH_REQ_XCOMP_PERM) or AVX512_BF16 is missing";
      cap = kLevels - 1;
    }
  }
  // float32: the best float32 build at or below the cap.
  if (has[kAvx512] && cap >= kAvx512) {
    d.float32 = &kFloat32Avx512, d.simd = &kSimdAvx512;
  } else if (has[kAvx2] && cap >= kAvx2) {
    d.float32 = &kFloat32Avx2, d.simd = &kSimdAvx2;
  } else {
    d.float32 = &kFloat32Baseline, d.simd = &kSimdBaseline;
  }
  // bfloat16: see attention_engines.h for the default rule.
  d.bfloat16 = nullptr;
  d.float_to_bf16 = d.simd->float_to_bf16;
  if (emulated) {
    d.bfloat16 = &kBf16AmxEmulated;
  } else if (has[kAmx] && cap >= kAmx) {
    d.bfloat16 = &kBf16Amx, d.float_to_bf16 = FloatToBf16Avx512;
  } else if (has[kAvx512Bf16] && (cap == kAvx512Bf16 || (cap > kAvx512Bf16 && !cpu_amx))) {
    d.bfloat16 = &kBf16Pairs, d.float_to_bf16 = FloatToBf16Avx512;
  }
  return d;
}

}  // namespace

const CpuDispatch& Dispatch() {
  static const CpuDispatch d = Select();
  return d;
}

}  // namespace sparse_attention
