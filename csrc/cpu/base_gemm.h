// The base layer's GEMM for linear_lora on CPU (float32, AVX-512): out = x W^T + bias for a
// decode-sized x (a few dozen rows), one range of columns per thread. Run inside the same
// parallel region as the LoRA items that follow it (linear_lora_cpu.cpp), it saves a separate GEMM call
// and its thread wake-ups; for these skinny shapes it also runs faster than ATen's GEMM here
// (benchmarks/NOTES.md).
#pragma once

#include <cstdint>

namespace lora_ext {
namespace cpu {

// out[m, n] = bias[n] + sum_k x[m, k] * w[n, k], float32, every row stride-1 along k and n.
struct BaseGemmArgs {
  const float* x;
  int64_t x_row_stride;
  const float* w;  // (n, k): nn.Linear's weight
  int64_t w_row_stride;
  const float* bias;  // (n) or nullptr
  float* out;
  int64_t out_row_stride;
  int64_t m, n, k;
};

// Columns [n_begin, n_end) of out, every row. Only where cpu_has_avx512().
void base_gemm_columns(const BaseGemmArgs& g, int64_t n_begin, int64_t n_end);

}  // namespace cpu
}  // namespace lora_ext
