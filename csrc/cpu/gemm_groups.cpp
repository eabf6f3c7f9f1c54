#include "cpu/gemm_groups.h"

#include <map>
#include <utility>

namespace lora_ext {
namespace cpu {

GemmGroups group_gemm_work(const LoraCall& call, const std::vector<WorkItem>& work) {
  std::map<std::pair<int64_t, int64_t>, std::vector<WorkItem>> by_shape;  // (count, rank) -> slots
  for (const WorkItem& w : work) by_shape[{w.count, call.rank_of(w.slot)}].push_back(w);
  GemmGroups groups;
  for (auto& entry : by_shape) {
    if (entry.second.size() >= 2) {
      groups.batched.push_back(std::move(entry.second));
    } else {
      groups.single.push_back(entry.second[0]);
    }
  }
  return groups;
}

at::Tensor GroupRows::of(const at::Tensor& t) const {
  const at::Tensor rows = first >= 0 ? t.narrow(0, first, slots * count) : t.index_select(0, index);
  return rows.view({slots, count, t.size(1)});
}

GroupRows group_rows(const at::Tensor& plan_order, const std::vector<WorkItem>& group) {
  GroupRows rows;
  rows.slots = static_cast<int64_t>(group.size());
  rows.count = group[0].count;
  const int32_t* order = plan_order.data_ptr<int32_t>();
  int64_t next = order[group[0].first];
  bool run = true;
  for (const WorkItem& w : group) {
    for (int64_t i = 0; i < w.count && run; ++i) run = order[w.first + i] == next++;
  }
  if (run) {
    rows.first = order[group[0].first];
    return rows;
  }
  std::vector<at::Tensor> parts;
  for (const WorkItem& w : group) parts.push_back(plan_order.narrow(0, w.first, w.count));
  rows.index = at::cat(parts).to(at::kLong);
  return rows;
}

namespace {

bool consecutive_slots(const std::vector<WorkItem>& group) {
  for (size_t i = 1; i < group.size(); ++i) {
    if (group[i].slot != group[0].slot + static_cast<int64_t>(i)) return false;
  }
  return true;
}

}  // namespace

at::Tensor slot_parts(const at::Tensor& t, const std::vector<WorkItem>& group, int64_t rank_dim, int64_t rank) {
  if (consecutive_slots(group)) return t.narrow(0, group[0].slot, group.size()).narrow(rank_dim, 0, rank);
  std::vector<at::Tensor> parts;  // stack copies each slot's part (contiguous ones by memcpy)
  for (const WorkItem& w : group) parts.push_back(t.select(0, w.slot).narrow(rank_dim - 1, 0, rank));
  return at::stack(parts);
}

void put_slot_parts(const at::Tensor& dst, const std::vector<WorkItem>& group, int64_t rank_dim, int64_t rank,
                    const at::Tensor& src) {
  if (consecutive_slots(group)) {
    dst.narrow(0, group[0].slot, group.size()).narrow(rank_dim, 0, rank).copy_(src);
    return;
  }
  for (size_t i = 0; i < group.size(); ++i) {
    dst.select(0, group[i].slot).narrow(rank_dim - 1, 0, rank).copy_(src.select(0, i));
  }
}

at::Tensor group_scales(const LoraCall& call, const std::vector<WorkItem>& group) {
  std::vector<float> scales;
  for (const WorkItem& w : group) scales.push_back(call.scale_of(w.slot));
  return at::tensor(scales, at::kFloat).view({-1, 1, 1});
}

}  // namespace cpu
}  // namespace lora_ext
