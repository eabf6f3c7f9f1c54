// The base layer's GEMM for linear_lora on CPU (AVX-512): out = x W^T + bias for a decode-sized x
// (up to 128 rows), one range of columns per thread, in float32, bfloat16 or float16 (float32
// sums; 16-bit outputs rounded to nearest even once). Run inside the same parallel region as the
// LoRA items that follow it (linear_lora_cpu.cpp), it saves a separate GEMM call and its thread
// wake-ups, and the items find x, out and the caches as the GEMM left them; where the library's GEMM
// has no faster unit for the dtype (AMX, AVX512-FP16) it also runs faster than ATen's at these skinny
// shapes (benchmarks/NOTES.md).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace lora_ext {
namespace cpu {

// out[m, n] = bias[n] + sum_k x[m, k] * w[n, k]; x, w, bias and out all of `dtype`, every row
// stride-1 along k and n.
struct BaseGemmArgs {
  const void* x;
  int64_t x_row_stride;
  const void* w;  // (n, k): nn.Linear's weight
  int64_t w_row_stride;
  const void* bias;  // (n) or nullptr
  void* out;
  int64_t out_row_stride;
  int64_t m, n, k;
  c10::ScalarType dtype;
};

// Columns [n_begin, n_end) of out, every row. Only where cpu_has_avx512(); float32 from
// cpu_packed_gemm_min_rows rows as packed_gemm_columns (packed_gemm_fits), else in dot-product
// tiles; bfloat16 uses vdpbf16ps where cpu_has_avx512_bf16() and the cpu_avx512_bf16 setting is
// on, else widens.
void base_gemm_columns(const BaseGemmArgs& g, int64_t n_begin, int64_t n_end);
bool packed_gemm_fits(const BaseGemmArgs& g);
// The same for float32 as outer products over packed blocks of W (base_gemm_packed_avx512.cpp).
void packed_gemm_columns(const BaseGemmArgs& g, int64_t n_begin, int64_t n_end);

}  // namespace cpu
}  // namespace lora_ext
