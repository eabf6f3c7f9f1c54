// The portable CPU item kernel: plain C++ for any CPU and any strides. The compiler vectorizes
// what it can for the baseline ISA; the AVX-512 kernel (item_avx512.cpp) is the fast path.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "cpu/item_kernels.h"

namespace lora_ext {
namespace cpu {
namespace {

constexpr int64_t kColBlock = 256;

template <typename T>
void load_floats(const T* src, int64_t stride, int64_t n, float* dst) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i * stride]);
  }
}

// A dot product with independent partial sums, so the compiler can keep several FMAs in flight.
float dot(const float* a, const float* b, int64_t n) {
  constexpr int kLanes = 16;
  float partial[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) partial[j] += a[i + j] * b[i + j];
  }
  float sum = 0.f;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (int j = 0; j < kLanes; ++j) sum += partial[j];
  return sum;
}

template <typename T>
void rows_to_float(const ItemArgs& p, float* xs) {
  const T* x = static_cast<const T*>(p.x);
  for (int64_t i = 0; i < p.count; ++i) {
    load_floats(x + p.rows[i] * p.x_row_stride, p.x_col_stride, p.d_in, xs + i * p.d_in);
  }
}

template <typename T>
void shrink(const ItemArgs& p, const float* xs, int64_t rank_begin, int64_t rank_end, float* u) {
  const T* a = static_cast<const T*>(p.a);
  thread_local std::vector<float> a_row;
  a_row.resize(p.d_in);
  for (int64_t r = rank_begin; r < rank_end; ++r) {  // each row of A is read once for all rows
    load_floats(a + r * p.a_rank_stride, p.a_col_stride, p.d_in, a_row.data());
    for (int64_t i = 0; i < p.count; ++i) u[i * p.rank + r] = p.scale * dot(a_row.data(), xs + i * p.d_in, p.d_in);
  }
}

template <typename T>
void expand(const ItemArgs& p, const float* u, int64_t col_begin, int64_t col_end) {
  const T* b = static_cast<const T*>(p.b);
  T* out = static_cast<T*>(p.out);
  thread_local std::vector<float> bt;
  bt.resize(p.rank * kColBlock);
  float acc[kColBlock];
  for (int64_t n0 = col_begin; n0 < col_end; n0 += kColBlock) {
    const int64_t cols = std::min(kColBlock, col_end - n0);
    for (int64_t r = 0; r < p.rank; ++r) {  // bt[r, j] = B[n0 + j, r]
      load_floats(b + n0 * p.b_out_stride + r * p.b_rank_stride, p.b_out_stride, cols, &bt[r * kColBlock]);
    }
    for (int64_t i = 0; i < p.count; ++i) {
      std::fill(acc, acc + cols, 0.f);
      for (int64_t r = 0; r < p.rank; ++r) {
        const float ur = u[i * p.rank + r];
        const float* br = &bt[r * kColBlock];
        for (int64_t j = 0; j < cols; ++j) acc[j] += ur * br[j];
      }
      T* dst = out + p.rows[i] * p.out_row_stride + n0 * p.out_col_stride;
      for (int64_t j = 0; j < cols; ++j) {
        T* o = dst + j * p.out_col_stride;
        *o = p.accumulate ? T(static_cast<float>(*o) + acc[j]) : T(acc[j]);
      }
    }
  }
}

template <typename T>
ItemKernels kernels_for() {
  return {&rows_to_float<T>, &shrink<T>, &expand<T>, nullptr, nullptr, KernelPath::kCpuItemsPortable};
}

}  // namespace

ItemKernels portable_item_kernels(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float: return kernels_for<float>();
    case c10::ScalarType::Half: return kernels_for<c10::Half>();
    default: return kernels_for<c10::BFloat16>();
  }
}

}  // namespace cpu
}  // namespace lora_ext
