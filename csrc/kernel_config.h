// Kernel choices and the record of which kernel paths ran.
//
// Settings are read from the environment once, when the module loads, and changed at run time
// through lora_ext.kernel_config (Python), which calls the set_kernel_config op. Kernels read a
// setting with one relaxed atomic load; nothing reads the environment per call. Each kernel path
// counts the calls that took it, so tests and benchmarks can tell which path really ran.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace lora_ext {

enum class Setting : int {
  kCpuIsa,           // "auto": AVX-512 item kernels where the CPU has them; "portable": never
  kCpuGemmMinRows,   // slots with at least this many rows take the CPU GEMM path (forward)
  kCpuBackwardGemmMinRows,  // the same for lora_backward (its per-slot kernels win longer)
  kCpuFusedLinear,   // "on"/"off": linear_lora's fused CPU path (lora_ext's GEMM + items)
  kCpuAvx512Bf16,    // "on"/"off": bfloat16 shrink with AVX512-BF16 dot products where present
  kCpuFusedLinear16Bit,  // "auto"/"on"/"off": whether bfloat16 and float16 take the fused path too
  kCpuFusedLinearMaxRows,  // the fused path's row limit (over 32 only when d_in <= 4096); 0: 128
  kCpuAmx,           // "on"/"off": bfloat16 and float16 fused on the AMX tile unit where the CPU and OS allow it
  kCpuPackedGemmMinRows,  // the fused float32 base GEMM runs on packed blocks of W from this many rows
  kCudaKernel,       // "auto", "simt" (CUDA cores) or "mma" (tensor cores, float16/bfloat16)
  kCount,
};

// Values of the enumerated settings, as kernels read them.
enum CpuIsa : int64_t { kCpuIsaAuto = 0, kCpuIsaPortable = 1 };
enum Fused16Bit : int64_t { kFused16BitAuto = 0, kFused16BitOn = 1, kFused16BitOff = 2 };
enum CudaKernel : int64_t { kCudaAuto = 0, kCudaSimt = 1, kCudaMma = 2 };

int64_t setting(Setting s);

enum class KernelPath : int {
  kCpuItemsAvx512,      // CPU item kernels, AVX-512 (bfloat16 with widening)
  kCpuItemsAvx512Bf16,  // CPU item kernels, AVX-512 with AVX512-BF16 dot products
  kCpuItemsPortable,    // CPU item kernels, portable C++
  kCpuItemsQuad,        // a thread ran decode items four at a time
  kCpuItemsSplit,       // items split over threads (fewer items than threads)
  kCpuGemmSegments,     // slots with many rows through ATen GEMMs (one by one or batched)
  kCpuGemmBatched,      // ... of them, slots with equal row counts and ranks as batched GEMMs
  kCpuGemmAmx,          // ... of them, bfloat16 on the AMX tile unit instead (amx_deltas.h)
  kCpuLinearFused,      // linear_lora: lora_ext's GEMM and the items in one parallel region
  kCpuLinearUnfused,    // linear_lora: ATen's linear, then the deltas
  kCpuLinearAmx,        // ... of the fused calls, bfloat16/float16 on the AMX tile unit (amx_linear.h)
  kCpuLinearPacked,     // ... of the fused calls, float32 with the base GEMM on packed blocks of W
  kCudaSimt,            // CUDA cores (decode kernels)
  kCudaMma,             // tensor cores (prefill kernels)
  kCount,
};

void count_path(KernelPath p);

// The op-facing functions (registered in lora_ops.cpp).
std::tuple<std::vector<std::string>, std::vector<std::string>> get_kernel_config();
void set_kernel_config(const std::string& name, const std::string& value);
std::tuple<std::vector<std::string>, std::vector<int64_t>> kernel_path_counts();
void reset_kernel_path_counts();

}  // namespace lora_ext
