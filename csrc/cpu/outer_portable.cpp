// The portable weight-gradient kernel (outer_kernels.h): plain C++ for any CPU and any strides.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "cpu/outer_kernels.h"

namespace lora_ext {
namespace cpu {
namespace {

constexpr int64_t kColBlock = 256;

template <typename T>
void outer(const OuterArgs& p, int64_t col_begin, int64_t col_end) {
  const T* y = static_cast<const T*>(p.y);
  T* out = static_cast<T*>(p.out);
  float acc[kColBlock];
  for (int64_t n0 = col_begin; n0 < col_end; n0 += kColBlock) {
    const int64_t cols = std::min(kColBlock, col_end - n0);
    for (int64_t j = 0; j < p.rank; ++j) {
      std::fill(acc, acc + cols, 0.f);
      for (int64_t i = 0; i < p.count; ++i) {
        const float wij = p.w[i * p.rank + j];
        const T* yi = y + p.rows[i] * p.y_row_stride + n0 * p.y_col_stride;
        for (int64_t c = 0; c < cols; ++c) acc[c] += wij * static_cast<float>(yi[c * p.y_col_stride]);
      }
      T* oj = out + j * p.out_rank_stride + n0 * p.out_col_stride;
      for (int64_t c = 0; c < cols; ++c) oj[c * p.out_col_stride] = T(acc[c]);
    }
  }
}

}  // namespace

OuterKernel portable_outer_kernel(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float: return {&outer<float>, KernelPath::kCpuItemsPortable};
    case c10::ScalarType::Half: return {&outer<c10::Half>, KernelPath::kCpuItemsPortable};
    default: return {&outer<c10::BFloat16>, KernelPath::kCpuItemsPortable};
  }
}

}  // namespace cpu
}  // namespace lora_ext
