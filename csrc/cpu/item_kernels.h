// The CPU work item: rows that share one slot, computed by an ISA-specific kernel.
//   u[i, :rank] = scale * A[:rank] x[row_i]          (shrink, float32)
//   out[row_i] (+)= B[:, :rank] u[i]                  (expand; "+" for add_lora_)
// Each ISA file provides an ItemKernel per dtype; lora_cpu.cpp chooses one at run time.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

namespace lora_ext {
namespace cpu {

struct ItemArgs {
  const void* x;  // element (0, 0) of x
  int64_t x_row_stride, x_col_stride;
  const int32_t* rows;  // the item's rows (indices into x and out)
  int64_t count;
  const void* a;  // A[slot]: (R, d_in)
  int64_t a_rank_stride, a_col_stride;
  const void* b;  // B[slot]: (d_out, R)
  int64_t b_out_stride, b_rank_stride;
  void* out;
  int64_t out_row_stride, out_col_stride;
  int64_t d_in, d_out, rank;
  float scale;
  bool accumulate;
};

// Per-thread buffers, reused across items.
struct Scratch {
  std::vector<float> x;  // count x d_in
  std::vector<float> u;  // count x rank
  std::vector<float> b;  // a block of B converted to float32
};

using ItemKernel = void (*)(const ItemArgs&, Scratch&);

ItemKernel portable_item_kernel(c10::ScalarType dtype);
// nullptr when this build or this CPU has no AVX-512, or the strides do not suit it.
ItemKernel avx512_item_kernel(c10::ScalarType dtype, const ItemArgs& example);
bool cpu_has_avx512();

}  // namespace cpu
}  // namespace lora_ext
