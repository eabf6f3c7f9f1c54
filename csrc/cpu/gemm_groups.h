// Slots with many rows run as ATen GEMMs. Slots whose rows have the same count and the same rank
// (one sequence per adapter in a training batch, equal-length prompts) run together as batched
// GEMMs: one bmm call for the whole group instead of a pair of small GEMMs per slot, which
// measured about twice the time on the bench model's layers (8 slots x 128 rows, rank 16; the
// per-call cost of a 128-row GEMM is most of its time). The forward's (lora_cpu.cpp) and the
// backward's (lora_backward_cpu.cpp) GEMM paths share the grouping and the row views here.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "cpu/work.h"

namespace lora_ext {
namespace cpu {

// A call's GEMM work split into groups of two or more slots with equal (row count, rank), run
// batched, and the slots left over, run one by one.
struct GemmGroups {
  std::vector<std::vector<WorkItem>> batched;
  std::vector<WorkItem> single;
};
GemmGroups group_gemm_work(const LoraCall& call, const std::vector<WorkItem>& work);

// The rows of one group, slot after slot: one consecutive run of the tensor's rows (`first`;
// then views need no copy) or an index for gathering and scattering.
struct GroupRows {
  int64_t slots = 0, count = 0;  // the group's slots and each one's rows
  int64_t first = -1;            // >= 0: rows first .. first + slots * count - 1, in slot order
  at::Tensor index;              // otherwise: (slots * count,) int64 row indices

  // (slots, count, t.size(1)): a view of t's rows when they form a run, else a gathered copy.
  at::Tensor of(const at::Tensor& t) const;
};
GroupRows group_rows(const at::Tensor& plan_order, const std::vector<WorkItem>& group);

// t (slots first) at the group's slots, `rank` long along rank_dim: a view when the slots are
// consecutive (a training batch's), else a copy stacked from each slot's part.
at::Tensor slot_parts(const at::Tensor& t, const std::vector<WorkItem>& group, int64_t rank_dim, int64_t rank);
// Writes src (the group's slots first) into those parts of dst.
void put_slot_parts(const at::Tensor& dst, const std::vector<WorkItem>& group, int64_t rank_dim, int64_t rank,
                    const at::Tensor& src);
// The group's scales as (slots, 1, 1) float32.
at::Tensor group_scales(const LoraCall& call, const std::vector<WorkItem>& group);

}  // namespace cpu
}  // namespace lora_ext
