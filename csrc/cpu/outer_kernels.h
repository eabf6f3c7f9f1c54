// The weight-gradient kernel of the CPU backward: one slot's sum of outer products,
//   out[j, n] = sum over i < count of w[i * rank + j] * y[rows[i], n]      (j < rank, all n)
// so dA_s = v^T x (y = x, w = v) and, rank-major, dB_s^T = u^T dy (y = dy, w = u). Sums run in
// float32 over the rows in their order (one thread per slot, so results never depend on the
// thread count) and are rounded once to the output's dtype. Rows of out at or beyond `rank` are
// not written. Each ISA file provides the kernel per dtype; lora_backward_cpu.cpp chooses.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "kernel_config.h"

namespace lora_ext {
namespace cpu {

struct OuterArgs {
  const void* y;  // element (0, 0) of y (x or dy), in the output's dtype
  int64_t y_row_stride, y_col_stride;
  const int32_t* rows;  // the slot's rows (indices into y)
  int64_t count;
  const float* w;  // count x rank
  int64_t rank;
  void* out;  // row 0 of the slot's gradient
  int64_t out_rank_stride, out_col_stride;
  int64_t width;  // columns of y and out
};

struct OuterKernel {
  // Columns [col_begin, col_end) of out, every rank.
  void (*run)(const OuterArgs&, int64_t col_begin, int64_t col_end);
  KernelPath path;
};

OuterKernel portable_outer_kernel(c10::ScalarType dtype);
// False when this build or this CPU has no AVX-512, or the strides do not suit it.
bool avx512_outer_kernel(c10::ScalarType dtype, const OuterArgs& example, OuterKernel* kernel);

}  // namespace cpu
}  // namespace lora_ext
