#include "lora_args.h"

#include "checks.h"
#include "plan.h"

#include <ATen/ATen.h>

namespace lora_ext {
namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

bool is_index_type(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  LORA_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
             x.device(), "; all arguments must be on the same device");
}

}  // namespace

LoraSizes check_lora_args(const char* op, const at::Tensor& x, const at::Tensor& lora_a,
                          const at::Tensor& lora_b, const at::Tensor& slot_ids,
                          const c10::optional<at::Tensor>& scales,
                          const c10::optional<at::Tensor>& ranks,
                          const c10::optional<at::Tensor>& plan) {
  LORA_CHECK(x.dim() == 2, op, ": x must be 2-D (T, d_in), but has shape ", x.sizes());
  LORA_CHECK(lora_a.dim() == 3, op, ": lora_a must be 3-D (S, R, d_in), but has shape ",
             lora_a.sizes());
  LORA_CHECK(lora_b.dim() == 3, op, ": lora_b must be 3-D (S, d_out, R), but has shape ",
             lora_b.sizes());
  LORA_CHECK(slot_ids.dim() == 1, op, ": slot_ids must be 1-D (T,), but has shape ",
             slot_ids.sizes());
  LORA_CHECK(is_float_type(x.scalar_type()), op,
             ": x must be float32, float16 or bfloat16, but is ", x.scalar_type());
  LORA_CHECK(lora_a.scalar_type() == x.scalar_type(), op, ": lora_a has dtype ",
             lora_a.scalar_type(), " but x has dtype ", x.scalar_type(), "; they must match");
  LORA_CHECK(lora_b.scalar_type() == x.scalar_type(), op, ": lora_b has dtype ",
             lora_b.scalar_type(), " but x has dtype ", x.scalar_type(), "; they must match");
  LORA_CHECK(is_index_type(slot_ids.scalar_type()), op,
             ": slot_ids must be int32 or int64, but is ", slot_ids.scalar_type());
  check_same_device(op, "lora_a", lora_a, x);
  check_same_device(op, "lora_b", lora_b, x);
  check_same_device(op, "slot_ids", slot_ids, x);

  LoraSizes s{x.size(0), x.size(1), lora_b.size(1), lora_a.size(0), lora_a.size(1)};
  LORA_CHECK(s.d_in >= 1, op, ": x must have at least one column, but has shape ", x.sizes());
  LORA_CHECK(s.slots >= 1 && s.max_rank >= 1, op,
             ": lora_a must hold at least one slot of rank at least 1, but has shape ",
             lora_a.sizes());
  LORA_CHECK(lora_a.size(2) == s.d_in, op, ": lora_a has shape ", lora_a.sizes(),
             " (S, R, d_in) but x has shape ", x.sizes(), " (T, d_in): d_in differs (",
             lora_a.size(2), " vs ", s.d_in, ")");
  LORA_CHECK(lora_b.size(0) == s.slots, op, ": lora_b has ", lora_b.size(0),
             " slots but lora_a has ", s.slots, " (shapes ", lora_b.sizes(), " and ",
             lora_a.sizes(), ")");
  LORA_CHECK(lora_b.size(2) == s.max_rank, op, ": lora_b has shape ", lora_b.sizes(),
             " (S, d_out, R) but lora_a has shape ", lora_a.sizes(), " (S, R, d_in): R differs (",
             lora_b.size(2), " vs ", s.max_rank, ")");
  LORA_CHECK(s.d_out >= 1, op, ": lora_b must have d_out >= 1, but has shape ", lora_b.sizes());
  LORA_CHECK(slot_ids.size(0) == s.rows, op, ": slot_ids has ", slot_ids.size(0),
             " entries but x has ", s.rows, " rows; there must be one slot id per row");

  if (scales.has_value()) {
    const at::Tensor& sc = *scales;
    LORA_CHECK(sc.dim() == 1 && sc.size(0) == s.slots, op, ": scales must have shape (S,) = (",
               s.slots, ",), but has shape ", sc.sizes());
    LORA_CHECK(sc.scalar_type() == at::kFloat, op, ": scales must be float32, but is ",
               sc.scalar_type());
    check_same_device(op, "scales", sc, x);
  }
  if (ranks.has_value()) {
    const at::Tensor& rk = *ranks;
    LORA_CHECK(rk.dim() == 1 && rk.size(0) == s.slots, op, ": ranks must have shape (S,) = (",
               s.slots, ",), but has shape ", rk.sizes());
    LORA_CHECK(is_index_type(rk.scalar_type()), op, ": ranks must be int32 or int64, but is ",
               rk.scalar_type());
    check_same_device(op, "ranks", rk, x);
  }
  if (plan.has_value()) {
    const at::Tensor& p = *plan;
    PlanLayout layout{s.rows, s.slots};
    LORA_CHECK(p.dim() == 1 && p.scalar_type() == at::kInt && p.size(0) == layout.size(), op,
               ": plan must be the int32 tensor that build_plan(slot_ids, ", s.slots,
               ") returns (", layout.size(), " entries for ", s.rows, " rows and ", s.slots,
               " slots), but has dtype ", p.scalar_type(), " and shape ", p.sizes());
    check_same_device(op, "plan", p, x);
  }
  return s;
}

void check_plan_args(const at::Tensor& slot_ids, int64_t num_slots) {
  LORA_CHECK(slot_ids.dim() == 1, "build_plan: slot_ids must be 1-D (T,), but has shape ", slot_ids.sizes());
  LORA_CHECK(is_index_type(slot_ids.scalar_type()), "build_plan: slot_ids must be int32 or int64, but is ",
             slot_ids.scalar_type());
  LORA_CHECK(num_slots >= 1, "build_plan: num_slots must be at least 1, but is ", num_slots);
  LORA_CHECK(slot_ids.size(0) < (int64_t{1} << 30) && num_slots < (int64_t{1} << 28), "build_plan: ",
             slot_ids.size(0), " rows and ", num_slots, " slots exceed the 32-bit plan (at most 2^30 rows and 2^28 slots)");
}

void check_out(const char* op, const char* name, const at::Tensor& out, const at::Tensor& x, const LoraSizes& s) {
  LORA_CHECK(out.dim() == 2 && out.size(0) == s.rows && out.size(1) == s.d_out, op, ": ", name,
             " must have shape (T, d_out) = (", s.rows, ", ", s.d_out, "), but has shape ", out.sizes());
  LORA_CHECK(out.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", out.scalar_type(),
             " but x has dtype ", x.scalar_type(), "; they must match");
  check_same_device(op, name, out, x);
}

void check_linear_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const LoraSizes& s) {
  const char* op = "linear_lora";
  LORA_CHECK(weight.dim() == 2 && weight.size(0) == s.d_out && weight.size(1) == s.d_in, op,
             ": weight must have shape (d_out, d_in) = (", s.d_out, ", ", s.d_in, ") to match x and lora_b, but has shape ",
             weight.sizes());
  LORA_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
             " but x has dtype ", x.scalar_type(), "; they must match");
  check_same_device(op, "weight", weight, x);
  if (!bias.has_value()) return;
  LORA_CHECK(bias->dim() == 1 && bias->size(0) == s.d_out, op, ": bias must have shape (d_out,) = (", s.d_out,
             ",), but has shape ", bias->sizes());
  LORA_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias has dtype ", bias->scalar_type(),
             " but x has dtype ", x.scalar_type(), "; they must match");
  check_same_device(op, "bias", *bias, x);
}

// Reads values[i] (int32 or int64, any stride) as int64.
int64_t index_at(const at::Tensor& t, int64_t i) {
  return t.scalar_type() == at::kInt ? t.data_ptr<int32_t>()[i * t.stride(0)]
                                     : t.data_ptr<int64_t>()[i * t.stride(0)];
}

void check_slot_id(int64_t row, int64_t id, int64_t num_slots) {
  LORA_CHECK(id >= -1 && id < num_slots, "slot_ids[", row, "] = ", id,
             " is out of range: slot ids must be -1 (no adapter) or in [0, ", num_slots - 1, "] for ",
             num_slots, " slots");
}

void check_slot_and_rank_values(const at::Tensor& slot_ids, const c10::optional<at::Tensor>& ranks,
                                const LoraSizes& s) {
  for (int64_t t = 0; t < s.rows; ++t) check_slot_id(t, index_at(slot_ids, t), s.slots);
  if (!ranks.has_value()) return;
  for (int64_t slot = 0; slot < s.slots; ++slot) {
    int64_t r = index_at(*ranks, slot);
    LORA_CHECK(r >= 0 && r <= s.max_rank, "ranks[", slot, "] = ", r,
               " is out of range: ranks must be in [0, R] = [0, ", s.max_rank, "]");
  }
}

}  // namespace lora_ext
