// The CPU kernels' dispatch, in one place: which engine runs the fused
// attention for each dtype, and which build of the SIMD primitives the other
// kernels use. Chosen once, when first used, from this CPU's instruction sets
// (and, for AMX, the kernel's permission to use the tile state), overridable
// by $SPARSE_ATTENTION_TF_ISA for tests and benchmarks.
//
// Engines (best first): "amx" (bf16 tile products, Intel AMX-BF16),
// "avx512_bf16" (bf16 pair products, vdpbf16ps), "avx512", "avx2" and
// "baseline" (float32). $SPARSE_ATTENTION_TF_ISA names the highest engine
// allowed: float32 runs on the best float32 engine at or below it, bfloat16
// on the best bf16 engine at or below it, or converted to float32. Asking for
// an engine this CPU lacks (or an unknown name) is an error of every fused op
// (and of the SparseAttention>CpuEngines op), never a silent fallback.
// "amx_emulated" is for tests only: the AMX engine's code with each tile
// instruction emulated in plain C++ (slow), so that its packing and tiling
// are checked on any CPU.
//
// The default rule for bfloat16 keeps it at least as fast as converting to
// float32: AMX where the CPU and the kernel allow it; the pair products
// where the CPU has AVX512_BF16 and no AMX (1.5-1.75x faster than float32 on
// an AMD EPYC with AVX512_BF16); else float32 (on an Intel CPU with AMX the
// pair products measured 0.65-0.70x of float32, so an AMX CPU whose kernel
// refuses the tile state converts to float32).
#ifndef SPARSE_ATTENTION_TF_KERNELS_ATTENTION_ENGINES_H_
#define SPARSE_ATTENTION_TF_KERNELS_ATTENTION_ENGINES_H_

#include <cstdint>
#include <string>

#include "custom_ops/cc/kernels/fused_attention.h"
#include "custom_ops/cc/kernels/simd.h"

namespace sparse_attention {

// One engine's fused kernels on operands of In (float, or uint16_t bf16 bits).
template <typename In>
struct AttentionEngine {
  const char* name;
  // Whether it takes these dims (e.g. bf16 pairs need even D and Dv); if
  // not, the op converts to float32.
  bool (*takes)(const AttentionProblem& a);
  // Forward over the query block-row units [begin, end) (Problem::num_units)
  // in a worker's scratch of forward_scratch(a) bytes (64-byte aligned). x.k
  // is head-major [B, H, N, D]; x.v head-major [B, H, N, Dv] for float32,
  // for bf16 pairs along the sequence [B, H, N/2, Dv, 2] (PackHeadsBf16).
  int64_t (*forward_scratch)(const AttentionProblem& a);
  void (*forward)(const AttentionProblem& a, const AttentionForwardArgs<In>& x, void* scratch,
                  int64_t begin, int64_t end);
  // Backward over the units [begin, end) of num_backward_units(), every
  // operand token-major, in backward_scratch(a) bytes per worker.
  int64_t (*backward_scratch)(const AttentionProblem& a);
  void (*backward)(const AttentionProblem& a, const AttentionBackwardArgs<In>& x, void* scratch,
                   int64_t begin, int64_t end);
};

struct CpuDispatch {
  std::string error;      // non-empty: $SPARSE_ATTENTION_TF_ISA cannot be honoured
  std::string requested;  // $SPARSE_ATTENTION_TF_ISA, "" if unset
  std::string available;  // the engines this CPU (and kernel) runs, best first, comma-separated
  const SimdKernels* simd;                   // the primitives of the float32 engine's ISA
  const AttentionEngine<float>* float32;     // never null
  const AttentionEngine<uint16_t>* bfloat16; // null: bf16 inputs convert to float32
  // float32 -> bf16 bits rounded to nearest even (vcvtneps2bf16 where the
  // CPU has AVX512_BF16, else the primitives' loop).
  void (*float_to_bf16)(const float* x, int64_t n, uint16_t* y);
};

// The dispatch of this process (chosen on first use). With an error, the
// fields hold the best engines (so that the primitives stay usable) and
// every fused op refuses to run.
const CpuDispatch& Dispatch();

// The engines each build provides (engine_float32.cc, engine_avx512_bf16.cc,
// engine_amx.cc).
extern const AttentionEngine<float> kFloat32Avx512, kFloat32Avx2, kFloat32Baseline;
extern const AttentionEngine<uint16_t> kBf16Pairs, kBf16Amx, kBf16AmxEmulated;
extern const SimdKernels kSimdAvx512, kSimdAvx2, kSimdBaseline;
void FloatToBf16Avx512(const float* x, int64_t n, uint16_t* y);
// Asks the kernel for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM),
// once per process; whether it was granted.
bool RequestAmxTileState();

}  // namespace sparse_attention

#endif  // SPARSE_ATTENTION_TF_KERNELS_ATTENTION_ENGINES_H_
