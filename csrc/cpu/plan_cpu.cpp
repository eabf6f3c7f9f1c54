// build_plan on CPU: a stable counting sort of rows by slot (see csrc/plan.h for the layout).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "lora_args.h"
#include "plan.h"

namespace lora_ext {

at::Tensor build_plan_cpu(const at::Tensor& slot_ids, int64_t num_slots) {
  check_plan_args(slot_ids, num_slots);
  const int64_t rows = slot_ids.size(0);
  PlanLayout layout{rows, num_slots};
  at::Tensor plan = at::zeros({layout.size()}, slot_ids.options().dtype(at::kInt));
  int32_t* p = plan.data_ptr<int32_t>();
  p[0] = static_cast<int32_t>(rows);
  p[1] = static_cast<int32_t>(num_slots);
  const int64_t bins = layout.num_bins();
  int32_t* offsets = p + layout.offsets();

  std::vector<int64_t> bin_of(rows);
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t id = index_at(slot_ids, t);
    check_slot_id(t, id, num_slots);
    bin_of[t] = id == -1 ? layout.no_adapter_bin() : id;
    offsets[bin_of[t] + 1] += 1;
  }
  int32_t* decode_tiles = p + layout.decode_tiles();
  int32_t* prefill_tiles = p + layout.prefill_tiles();
  for (int64_t b = 0; b < bins; ++b) {
    const int32_t count = offsets[b + 1];
    offsets[b + 1] = offsets[b] + count;
    decode_tiles[b + 1] = decode_tiles[b] + (count + kDecodeTileRows - 1) / kDecodeTileRows;
    prefill_tiles[b + 1] = prefill_tiles[b] + (count + kPrefillTileRows - 1) / kPrefillTileRows;
  }
  std::vector<int32_t> cursor(offsets, offsets + bins);
  int32_t* order = p + layout.order();
  for (int64_t t = 0; t < rows; ++t) order[cursor[bin_of[t]]++] = static_cast<int32_t>(t);
  return plan;
}

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) { m.impl("build_plan", &build_plan_cpu); }

}  // namespace lora_ext
