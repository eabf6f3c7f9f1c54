// build_plan on CUDA: one block groups rows by slot (layout in csrc/plan.h) entirely on the
// device, so it can run inside a CUDA graph and be rebuilt when the slot ids change.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "lora_args.h"
#include "plan.h"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kPlanThreads = 1024;
constexpr int kMaxSharedCursorBins = 8192;
constexpr int kWarpSize = 32;

struct Totals {
  int rows, decode_tiles, prefill_tiles;
};

__device__ __forceinline__ int bin_of(const void* ids, bool ids_int64, int64_t stride, int t,
                                      const PlanLayout& layout) {
  const int64_t id = ids_int64 ? static_cast<const int64_t*>(ids)[t * stride]
                               : static_cast<const int32_t*>(ids)[t * stride];
  if (id == -1) return static_cast<int>(layout.no_adapter_bin());
  if (id < -1 || id >= layout.num_slots) return static_cast<int>(layout.invalid_bin());  // rows get NaN
  return static_cast<int>(id);
}

__device__ __forceinline__ Totals tiles_of(int count) {
  return {count, (count + static_cast<int>(kDecodeTileRows) - 1) / static_cast<int>(kDecodeTileRows),
          (count + static_cast<int>(kPrefillTileRows) - 1) / static_cast<int>(kPrefillTileRows)};
}

// Exclusive scan of one Totals per thread across the block; returns this thread's prefix.
__device__ Totals block_exclusive_scan(Totals mine, Totals* scratch) {
  const int tid = threadIdx.x;
  scratch[tid] = mine;
  __syncthreads();
  for (int step = 1; step < kPlanThreads; step *= 2) {
    Totals add{0, 0, 0};
    if (tid >= step) add = scratch[tid - step];
    __syncthreads();
    scratch[tid].rows += add.rows;
    scratch[tid].decode_tiles += add.decode_tiles;
    scratch[tid].prefill_tiles += add.prefill_tiles;
    __syncthreads();
  }
  const Totals inclusive = scratch[tid];
  return {inclusive.rows - mine.rows, inclusive.decode_tiles - mine.decode_tiles,
          inclusive.prefill_tiles - mine.prefill_tiles};
}

__global__ void __launch_bounds__(kPlanThreads)
build_plan_kernel(const void* ids, bool ids_int64, int64_t ids_stride, PlanLayout layout, int32_t* plan,
                  int32_t* global_cursor, bool shared_cursor) {
  __shared__ Totals scan_scratch[kPlanThreads];
  extern __shared__ int32_t dynamic_smem[];
  const int rows = static_cast<int>(layout.num_rows), slots = static_cast<int>(layout.num_slots);
  const int bins = static_cast<int>(layout.num_bins());
  int32_t* offsets = plan + layout.offsets();
  int32_t* decode_tiles = plan + layout.decode_tiles();
  int32_t* prefill_tiles = plan + layout.prefill_tiles();
  int32_t* order = plan + layout.order();
  int32_t* cursor = shared_cursor ? dynamic_smem : global_cursor;
  const int tid = threadIdx.x;

  if (tid == 0) {
    plan[0] = rows;
    plan[1] = slots;
  }
  for (int i = tid; i < bins + 1; i += kPlanThreads) offsets[i] = decode_tiles[i] = prefill_tiles[i] = 0;
  __syncthreads();
  for (int t = tid; t < rows; t += kPlanThreads) {  // counts, kept in offsets[bin + 1] for now
    atomicAdd(&offsets[bin_of(ids, ids_int64, ids_stride, t, layout) + 1], 1);
  }
  __syncthreads();

  // Each thread owns a contiguous chunk of bins; scan chunk totals, then write the prefixes.
  const int chunk = (bins + kPlanThreads - 1) / kPlanThreads;
  const int first_bin = min(bins, tid * chunk), last_bin = min(bins, first_bin + chunk);
  Totals mine{0, 0, 0};
  for (int b = first_bin; b < last_bin; ++b) {
    const Totals t = tiles_of(offsets[b + 1]);
    mine.rows += t.rows;
    mine.decode_tiles += t.decode_tiles;
    mine.prefill_tiles += t.prefill_tiles;
  }
  Totals running = block_exclusive_scan(mine, scan_scratch);
  for (int b = first_bin; b < last_bin; ++b) {
    const Totals t = tiles_of(offsets[b + 1]);
    running.rows += t.rows;
    running.decode_tiles += t.decode_tiles;
    running.prefill_tiles += t.prefill_tiles;
    offsets[b + 1] = running.rows;
    decode_tiles[b + 1] = running.decode_tiles;
    prefill_tiles[b + 1] = running.prefill_tiles;
  }
  __syncthreads();
  for (int b = tid; b < bins; b += kPlanThreads) cursor[b] = offsets[b];
  __syncthreads();

  // Stable placement by one warp, 32 rows at a time: rows of a bin keep their order.
  if (tid >= kWarpSize) return;
  const unsigned lanes_below = (1u << tid) - 1u;
  for (int base = 0; base < rows; base += kWarpSize) {
    const int t = base + tid;
    const bool valid = t < rows;
    const int bin = valid ? bin_of(ids, ids_int64, ids_stride, t, layout) : -1 - tid;
    const unsigned peers = __match_any_sync(0xffffffffu, bin);
    const int leader = __ffs(peers) - 1;
    const int start = __shfl_sync(0xffffffffu, tid == leader && valid ? cursor[bin] : 0, leader);
    if (valid) order[start + __popc(peers & lanes_below)] = t;
    __syncwarp();
    if (valid && tid == leader) cursor[bin] = start + __popc(peers);
    __syncwarp();
  }
}

}  // namespace

at::Tensor build_plan_cuda(const at::Tensor& slot_ids, int64_t num_slots) {
  check_plan_args(slot_ids, num_slots);
  const c10::cuda::CUDAGuard guard(slot_ids.device());
  const PlanLayout layout{slot_ids.size(0), num_slots};
  at::Tensor plan = at::empty({layout.size()}, slot_ids.options().dtype(at::kInt));
  const int bins = static_cast<int>(layout.num_bins());
  const bool shared_cursor = bins <= kMaxSharedCursorBins;
  at::Tensor cursor = shared_cursor ? at::Tensor() : at::empty({bins}, plan.options());
  const size_t smem = shared_cursor ? bins * sizeof(int32_t) : 0;
  build_plan_kernel<<<1, kPlanThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      slot_ids.data_ptr(), slot_ids.scalar_type() == at::kLong, slot_ids.stride(0), layout, plan.data_ptr<int32_t>(),
      shared_cursor ? nullptr : cursor.data_ptr<int32_t>(), shared_cursor);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return plan;
}

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) { m.impl("build_plan", &build_plan_cuda); }

}  // namespace cuda
}  // namespace lora_ext
