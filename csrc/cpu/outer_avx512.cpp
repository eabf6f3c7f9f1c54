// The AVX-512 weight-gradient kernel (outer_kernels.h): blocks of 64 columns; for each rank, an
// FMA chain over the slot's rows (rows read from L1 after the first rank) into four 16-lane
// float32 accumulators, stored once in the output's dtype. Full aligned blocks are streamed past
// the caches: the gradients are written once and read only by the optimizer, later, and a
// streamed line skips the read of the destination that an ordinary store costs.
#include <algorithm>
#include <cstdint>

#include "cpu/avx512_isa.h"
#include "cpu/item_kernels.h"
#include "cpu/outer_kernels.h"

#ifdef LORA_EXT_HAVE_AVX512
#include "cpu/avx512_begin.h"

#include "cpu/avx512_lanes.h"

namespace lora_ext {
namespace cpu {
namespace {

using namespace avx512;

constexpr int kVectors = 4;  // 64 columns a block

template <typename T>
void outer(const OuterArgs& p, int64_t col_begin, int64_t col_end) {
  const T* y = static_cast<const T*>(p.y);
  T* out = static_cast<T*>(p.out);
  for (int64_t n0 = col_begin; n0 < col_end; n0 += 16 * kVectors) {
    __mmask16 m[kVectors];
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) m[v] = first_lanes(col_end - n0 - 16 * v);
    for (int64_t j = 0; j < p.rank; ++j) {
      __m512 acc[kVectors];
#pragma GCC unroll 4
      for (int v = 0; v < kVectors; ++v) acc[v] = _mm512_setzero_ps();
      for (int64_t i = 0; i < p.count; ++i) {
        const __m512 wij = _mm512_set1_ps(p.w[i * p.rank + j]);
        const T* yi = y + p.rows[i] * p.y_row_stride + n0;
#pragma GCC unroll 4
        for (int v = 0; v < kVectors; ++v) acc[v] = _mm512_fmadd_ps(wij, load_16_lanes(yi + 16 * v, m[v]), acc[v]);
      }
      T* oj = out + j * p.out_rank_stride + n0;
      if (col_end - n0 >= 16 * kVectors && reinterpret_cast<uintptr_t>(oj) % (16 * sizeof(T)) == 0) {
#pragma GCC unroll 4
        for (int v = 0; v < kVectors; ++v) stream_16_lanes(oj + 16 * v, acc[v]);
      } else {
#pragma GCC unroll 4
        for (int v = 0; v < kVectors; ++v) store_16_lanes(oj + 16 * v, acc[v], m[v]);
      }
    }
  }
  _mm_sfence();  // the streamed gradients are visible before the caller's threads join
}

}  // namespace

OuterKernel avx512_outer_kernel_for(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float: return {&outer<float>, KernelPath::kCpuItemsAvx512};
    case c10::ScalarType::Half: return {&outer<c10::Half>, KernelPath::kCpuItemsAvx512};
    default: return {&outer<c10::BFloat16>, KernelPath::kCpuItemsAvx512};
  }
}

}  // namespace cpu
}  // namespace lora_ext

#include "cpu/avx512_end.h"
#endif  // LORA_EXT_HAVE_AVX512

namespace lora_ext {
namespace cpu {

bool avx512_outer_kernel(c10::ScalarType dtype, const OuterArgs& example, OuterKernel* kernel) {
#ifdef LORA_EXT_HAVE_AVX512
  if (example.y_col_stride != 1 || example.out_col_stride != 1 || !cpu_has_avx512()) return false;
  *kernel = avx512_outer_kernel_for(dtype);
  return true;
#else
  (void)dtype;
  (void)example;
  (void)kernel;
  return false;
#endif
}

}  // namespace cpu
}  // namespace lora_ext
