// linear_lora's fusion rule on CPU, asked by the kernel and, through the linear_lora_fuses op,
// by Python (the benchmark), so the rule is written once.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace lora_ext {
namespace cpu {

// Whether linear_lora runs the base GEMM and the deltas fused for a batch of `rows` rows of width
// `d_in` in `dtype`, given this CPU and the kernel settings (a call also needs unit strides along
// rows and no slot on the GEMM path).
bool linear_lora_fuses(int64_t rows, int64_t d_in, at::ScalarType dtype);

}  // namespace cpu
}  // namespace lora_ext
