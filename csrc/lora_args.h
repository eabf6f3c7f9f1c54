// Validation shared by every backend: shapes, dtypes and devices of the op arguments.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace lora_ext {

struct LoraSizes {
  int64_t rows;     // T
  int64_t d_in;
  int64_t d_out;
  int64_t slots;    // S
  int64_t max_rank; // R
};

// Checks everything that can be checked without reading tensor values (so it never syncs a GPU).
LoraSizes check_lora_args(const char* op, const at::Tensor& x, const at::Tensor& lora_a,
                          const at::Tensor& lora_b, const at::Tensor& slot_ids,
                          const c10::optional<at::Tensor>& scales,
                          const c10::optional<at::Tensor>& ranks,
                          const c10::optional<at::Tensor>& plan);

// build_plan's arguments: 1-D int32/int64 slot ids, at least one slot, sizes the plan can index.
void check_plan_args(const at::Tensor& slot_ids, int64_t num_slots);

// A (T, d_out) tensor in x's dtype and on x's device: add_lora_'s out, lora_backward's grad_out.
void check_out(const char* op, const char* name, const at::Tensor& out, const at::Tensor& x,
               const LoraSizes& sizes);

// linear_lora's base layer: weight (d_out, d_in) and bias (d_out,), same dtype and device as x.
void check_linear_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const LoraSizes& sizes);

// ids[i] of an int32 or int64 CPU tensor with any stride, as int64.
int64_t index_at(const at::Tensor& ids, int64_t i);

// The one slot-id range check: -1 (no adapter) or a slot in [0, num_slots).
void check_slot_id(int64_t row, int64_t id, int64_t num_slots);

// Value checks that read slot ids and ranks (CPU tensors only: always done there).
void check_slot_and_rank_values(const at::Tensor& slot_ids, const c10::optional<at::Tensor>& ranks,
                                const LoraSizes& sizes);

}  // namespace lora_ext
