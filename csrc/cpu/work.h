// How one CPU call's rows become work, shared by add_lora_/lora_delta (lora_cpu.cpp) and
// linear_lora (linear_lora_cpu.cpp): the plan's bins of rows per slot become items (at most
// kRowBlock rows of one slot, for the item kernels) or GEMM segments (slots with many rows).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "cpu/amx_linear.h"
#include "cpu/item_kernels.h"
#include "lora_args.h"
#include "plan.h"

namespace lora_ext {
namespace cpu {

constexpr int64_t kRowBlock = 16;

struct WorkItem {
  int64_t slot;   // -1: rows without an adapter (or of rank 0) that lora_delta must zero
  int64_t first;  // index into the plan's order
  int64_t count;
};

// The tensors of one call; out receives (accumulate) or is set to (not) the deltas.
struct LoraCall {
  const at::Tensor& x;
  const at::Tensor& lora_a;
  const at::Tensor& lora_b;
  at::Tensor& out;
  const c10::optional<at::Tensor>& scales;
  const c10::optional<at::Tensor>& ranks;
  const LoraSizes& sizes;
  bool accumulate;

  int64_t rank_of(int64_t slot) const { return ranks ? index_at(*ranks, slot) : sizes.max_rank; }
  float scale_of(int64_t slot) const {
    return scales ? scales->data_ptr<float>()[slot * scales->stride(0)] : 1.0f;
  }
};

// The work of one call: items for the item kernels, segments for the GEMM path.
struct Work {
  std::vector<WorkItem> items, gemm_segments;
};

// A float buffer reused across calls from the same thread: no allocation, no zero fill, no
// fresh pages on the hot path.
class ReusedBuffer {
 public:
  float* get(int64_t size) {
    if (size > capacity_) {
      data_.reset(new float[size]);
      capacity_ = size;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<float[]> data_;
  int64_t capacity_ = 0;
};

// The plan of a call: the given one, or one built here.
at::Tensor plan_for(const at::Tensor& slot_ids, const c10::optional<at::Tensor>& plan_arg, const LoraSizes& sizes);

Work collect_work(const LoraCall& call, const int32_t* offsets, const PlanLayout& layout);

// The cpu_isa setting "portable" forces the portable kernels (tests cover both that way).
bool portable_forced();
ItemKernels choose_item_kernels(at::ScalarType dtype, const ItemArgs& example);
ItemArgs item_args(const LoraCall& call, const int32_t* order, const WorkItem& item);
// The AMX kernels' view of an item's rows (amx_linear.h, amx_deltas.h): its slot's adapter, rank and scale.
AmxSegment amx_segment(const LoraCall& call, const WorkItem& item);

// out[rows] (+)= scale * (x[rows] @ A[:rank]^T) @ B[:, :rank]^T as two ATen GEMMs.
void run_gemm_segment(const LoraCall& call, const at::Tensor& plan_order, const WorkItem& seg);
// The same for two or more slots with equal row counts and ranks as batched GEMMs (gemm_groups.h).
void run_gemm_group(const LoraCall& call, const at::Tensor& plan_order, const std::vector<WorkItem>& group);
// Whole items [begin, end) of `args` on the calling thread: four at a time where kernels.quad
// exists and quad_fits (grouped by rank), the rest one by one. xs: the float32 rows (when
// kernels.rows_to_float exists) at xs_offset[i]; u: room for each item's count x rank at u_offset[i].
void run_whole_items(const ItemKernels& kernels, const std::vector<ItemArgs>& args, int64_t begin, int64_t end,
                     const float* xs, const std::vector<int64_t>& xs_offset, float* u,
                     const std::vector<int64_t>& u_offset);
// The items on the intra-op thread pool, whole or split in parts depending on their number.
void run_items(const LoraCall& call, const int32_t* order, const std::vector<WorkItem>& items);
// All of a call's work: its GEMM segments, then its items.
void run_work(const LoraCall& call, const at::Tensor& plan, const PlanLayout& layout, const Work& work);

}  // namespace cpu
}  // namespace lora_ext
