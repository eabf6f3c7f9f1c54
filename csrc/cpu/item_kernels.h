// The CPU work item: rows that share one slot, computed by ISA-specific kernels.
//   u[i, :rank] = scale * A[:rank] x[row_i]          (shrink, float32)
//   out[row_i] (+)= B[:, :rank] u[i]                  (expand; "+" for add_lora_)
// Each ISA file provides ItemKernels per dtype; lora_cpu.cpp chooses them at run time.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "kernel_config.h"

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
  // The shrink asks for (its share of) B ahead of the expand: worth it when an item is split
  // over threads (run_items turns it on there), not when whole items run back to back.
  bool prefetch_b = false;
};

// The three steps of an item, each over a part of it so that several threads can share one
// item (a batch of one row, or rows that all share one adapter, still uses every core).
struct ItemKernels {
  // xs[i, :] = x[rows[i], :] as float32 (count x d_in); nullptr when shrink reads x itself
  void (*rows_to_float)(const ItemArgs&, float* xs);
  // u[i, r] = scale * <A[r], x[rows[i]]> for rank_begin <= r < rank_end (u: count x rank), reading
  // the rows from xs when rows_to_float exists, else from x directly
  void (*shrink)(const ItemArgs&, const float* xs, int64_t rank_begin, int64_t rank_end, float* u);
  // out[rows[i], n] (+)= sum_r B[n, r] u[i, r] for col_begin <= n < col_end
  void (*expand)(const ItemArgs&, const float* u, int64_t col_begin, int64_t col_end);
  // Shrink and expand of kQuadItems whole items that quad_fits(), ranks in descending order, in
  // lockstep (u[i]: item i's rank floats); nullptr where this ISA has none. Same sums in the same
  // order as shrink and expand, so the same results bit for bit.
  void (*quad)(const ItemArgs* const* items, float* const* u);
  // The shrink alone of kQuadItems one-row items, in lockstep, ranks in descending order (the
  // backward's v and u); nullptr where this ISA has none.
  void (*quad_shrink)(const ItemArgs* const* items, float* const* u);
  // Which kernels these are, for the record of paths that ran (kernel_config.h).
  KernelPath path;
};

// Items run four at a time when they have one row each and B rank-major: four long streams
// through memory keep a core's loads in flight better than one item's sixteen short ones
// (benchmarks/NOTES.md). Items of different ranks may share a group.
constexpr int kQuadItems = 4;
inline bool quad_fits(const ItemArgs& p) { return p.count == 1 && p.b_out_stride == 1 && p.rank > 0; }

// When items are split over threads, a shrink task covers this many ranks of one item and an
// expand task this many output columns.
constexpr int64_t kShrinkTaskRanks = 8;
constexpr int64_t kExpandTaskColumns = 256;

ItemKernels portable_item_kernels(c10::ScalarType dtype);
// False when this build or this CPU has no AVX-512, or the strides do not suit it.
bool avx512_item_kernels(c10::ScalarType dtype, const ItemArgs& example, ItemKernels* kernels);
bool cpu_has_avx512();
bool cpu_has_avx512_bf16();
// What the library's GEMM may use instead (linear_lora's fusion rule asks): AMX for bfloat16,
// AVX512-FP16 for float16.
bool cpu_has_amx_bf16();
bool cpu_has_avx512_fp16();

}  // namespace cpu
}  // namespace lora_ext
