// lora_backward on CPU: the gradients of the LoRA delta. For every slot s (rank r, scale c) and
// each of its rows t:
//   v_t = c B_s[:, :r]^T dy_t      u_t = c A_s[:r] x_t                      (float32, r values)
//   dx_t = A_s[:r]^T v_t           dA_s[:r] = sum_t v_t x_t^T      dB_s[:, :r] = sum_t dy_t u_t^T
// u is recomputed rather than saved by the forward: the dx expand reads A_s anyway, and the
// shrink that recomputes u reads it just before, so A_s comes from DRAM once.
//
// A slot is one work unit: its sums over rows stay in one thread, in row order, so results do not
// depend on the thread count. Slots with many rows (cpu_backward_gemm_min_rows) run as ATen GEMMs,
// batched when several have equal row counts and ranks (gemm_groups.h). Each
// slot reads only its own rows: a NaN in one row's dy or x reaches only that row's dx and that
// slot's dA and dB. Gradient rows beyond a slot's rank, slots without rows, and dx rows without an
// adapter are exactly zero.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "cpu/gemm_groups.h"
#include "cpu/item_kernels.h"
#include "cpu/outer_kernels.h"
#include "cpu/work.h"
#include "lora_args.h"
#include "plan.h"

namespace lora_ext {
namespace cpu {
namespace {

struct Grads {
  at::Tensor dx, da, db;  // undefined where not asked for
};

// The tensors of one backward call and where a slot's pieces start.
struct BackwardCall {
  const at::Tensor& dy;
  const at::Tensor& x;
  const at::Tensor& lora_a;
  const at::Tensor& lora_b;
  const LoraCall& lora;  // x, A, B, scales, ranks, sizes
  Grads& grads;

  template <typename Ptr>
  static Ptr slot_ptr(const at::Tensor& t, int64_t slot) {
    return reinterpret_cast<Ptr>(static_cast<char*>(t.data_ptr()) + slot * t.stride(0) * t.element_size());
  }
};

// The forward item computation with the roles of A and B swapped: x = dy, the shrink reads B's rank
// rows (v = c B^T dy) and the expand A's rank rows as a rank-major B (dx = A^T v), so the forward's
// kernels compute v and dx.
ItemArgs dy_through_b_then_a(const BackwardCall& c, const WorkItem& unit, const int32_t* order) {
  ItemArgs a{};
  a.x = c.dy.data_ptr();
  a.x_row_stride = c.dy.stride(0);
  a.x_col_stride = c.dy.stride(1);
  a.rows = order + unit.first;
  a.count = unit.count;
  a.a = BackwardCall::slot_ptr<const void*>(c.lora_b, unit.slot);
  a.a_rank_stride = c.lora_b.stride(2);
  a.a_col_stride = c.lora_b.stride(1);
  a.b = BackwardCall::slot_ptr<const void*>(c.lora_a, unit.slot);
  a.b_out_stride = c.lora_a.stride(2);
  a.b_rank_stride = c.lora_a.stride(1);
  const at::Tensor& dx = c.grads.dx;
  a.out = dx.defined() ? dx.data_ptr() : nullptr;
  a.out_row_stride = dx.defined() ? dx.stride(0) : 0;
  a.out_col_stride = dx.defined() ? dx.stride(1) : 1;
  a.d_in = c.lora.sizes.d_out;
  a.d_out = c.lora.sizes.d_in;
  a.rank = c.lora.rank_of(unit.slot);
  a.scale = c.lora.scale_of(unit.slot);
  a.accumulate = false;
  return a;
}

// dA_s = v^T x (w = v, y = x) or dB_s^T = u^T dy (w = u, y = dy), into the slot's gradient.
OuterArgs outer_args(const at::Tensor& y, const at::Tensor& grad, int64_t rank_dim, int64_t col_dim,
                     const WorkItem& unit, const int32_t* order, const float* w, int64_t rank) {
  return OuterArgs{y.data_ptr(), y.stride(0), y.stride(1), order + unit.first, unit.count, w, rank,
                   BackwardCall::slot_ptr<void*>(grad, unit.slot), grad.stride(rank_dim), grad.stride(col_dim),
                   y.size(1)};
}

OuterKernel choose_outer_kernel(at::ScalarType dtype, const OuterArgs& example) {
  OuterKernel kernel;
  if (!portable_forced() && avx512_outer_kernel(dtype, example, &kernel)) return kernel;
  return portable_outer_kernel(dtype);
}

// The float32 rows a portable shrink reads (AVX-512 shrinks read their rows directly).
const float* rows_for(const ItemKernels& k, const ItemArgs& args, ReusedBuffer& buffer) {
  if (k.rows_to_float == nullptr) return nullptr;
  float* xs = buffer.get(args.count * args.d_in);
  k.rows_to_float(args, xs);
  return xs;
}

// Units [begin, end) on the calling thread. First the low-rank products, v = c B^T dy (with dx =
// A^T v) and u = c A x, each unit's count x rank floats at offset[i]; one-row units (decode) run
// four at a time where the kernels can (four long streams through memory keep more loads in flight
// than one unit's short ones: the forward's four-item kernel computes v and dx, its shrink u); the
// rest one by one. Then each unit's dA and dB.
void run_units(const BackwardCall& c, const std::vector<WorkItem>& units, int64_t begin, int64_t end,
               const int32_t* order) {
  thread_local ReusedBuffer u_buffer, v_buffer, rows_buffer;
  const at::ScalarType dtype = c.x.scalar_type();
  const bool need_dx = c.grads.dx.defined(), need_v = need_dx || c.grads.da.defined(), need_u = c.grads.db.defined();
  const int64_t n = end - begin;
  std::vector<int64_t> offset(n + 1, 0);
  std::vector<ItemArgs> by_b(n), by_a(n);
  for (int64_t i = 0; i < n; ++i) {
    by_b[i] = dy_through_b_then_a(c, units[begin + i], order);
    by_a[i] = item_args(c.lora, order, units[begin + i]);
    offset[i + 1] = offset[i] + by_a[i].count * by_a[i].rank;
  }
  float* v = v_buffer.get(offset[n]);
  float* u = u_buffer.get(offset[n]);
  const ItemKernels kb = choose_item_kernels(dtype, by_b[0]), ka = choose_item_kernels(dtype, by_a[0]);
  const bool quad_ok = kb.quad != nullptr && ka.quad_shrink != nullptr;
  std::vector<int64_t> quads, alone;
  for (int64_t i = 0; i < n; ++i) (quad_ok && quad_fits(by_b[i]) ? quads : alone).push_back(i);
  std::stable_sort(quads.begin(), quads.end(), [&](int64_t x, int64_t y) { return by_a[x].rank > by_a[y].rank; });
  const size_t grouped = quads.size() - quads.size() % kQuadItems;
  alone.insert(alone.end(), quads.begin() + grouped, quads.end());
  if (grouped > 0) count_path(KernelPath::kCpuItemsQuad);
  for (size_t j = 0; j < grouped; j += kQuadItems) {
    const ItemArgs *qb[kQuadItems], *qa[kQuadItems];
    float *qv[kQuadItems], *qu[kQuadItems];
    for (int g = 0; g < kQuadItems; ++g) {
      const int64_t i = quads[j + g];
      qb[g] = &by_b[i];
      qa[g] = &by_a[i];
      qv[g] = v + offset[i];
      qu[g] = u + offset[i];
    }
    if (need_dx) {
      kb.quad(qb, qv);
    } else if (need_v) {
      kb.quad_shrink(qb, qv);
    }
    if (need_u) ka.quad_shrink(qa, qu);
  }
  for (const int64_t i : alone) {
    if (need_v) kb.shrink(by_b[i], rows_for(kb, by_b[i], rows_buffer), 0, by_b[i].rank, v + offset[i]);
    if (need_u) ka.shrink(by_a[i], rows_for(ka, by_a[i], rows_buffer), 0, by_a[i].rank, u + offset[i]);
    if (need_dx) kb.expand(by_b[i], v + offset[i], 0, by_b[i].d_out);
  }
  for (int64_t i = 0; i < n; ++i) {
    const WorkItem& unit = units[begin + i];
    if (c.grads.da.defined()) {
      const OuterArgs da = outer_args(c.x, c.grads.da, 1, 2, unit, order, v + offset[i], by_a[i].rank);
      choose_outer_kernel(dtype, da).run(da, 0, da.width);
    }
    if (need_u) {
      const OuterArgs db = outer_args(c.dy, c.grads.db, 2, 1, unit, order, u + offset[i], by_a[i].rank);
      choose_outer_kernel(dtype, db).run(db, 0, db.width);
    }
  }
}

// One slot with many rows as ATen GEMMs. The scale goes in as the GEMMs' alpha, so each result is
// rounded once more than the float32 sums of the item path: v and u once to the inputs' dtype (as
// the forward's GEMM path rounds u), the gradients once.
void run_gemm_unit(const BackwardCall& c, const at::Tensor& plan_order, const WorkItem& unit) {
  const int64_t rank = c.lora.rank_of(unit.slot);
  const double scale = c.lora.scale_of(unit.slot);
  const at::Tensor a = c.lora_a.select(0, unit.slot).narrow(0, 0, rank);  // (rank, d_in)
  const at::Tensor b = c.lora_b.select(0, unit.slot).narrow(1, 0, rank);  // (d_out, rank)
  // A slot's rows in one run (a prompt's tokens) are read in place; scattered rows are gathered.
  const int32_t* order = plan_order.data_ptr<int32_t>() + unit.first;
  const bool consecutive = order[unit.count - 1] - order[0] == unit.count - 1;  // order ascends
  const at::Tensor rows = consecutive ? at::Tensor() : plan_order.narrow(0, unit.first, unit.count).to(at::kLong);
  const at::Tensor xs = consecutive ? c.x.narrow(0, order[0], unit.count) : c.x.index_select(0, rows);
  const at::Tensor dys = consecutive ? c.dy.narrow(0, order[0], unit.count) : c.dy.index_select(0, rows);
  // dst = scale * m1 @ m2 (beta = 0: dst's old contents are not read)
  auto scaled_mm = [scale](at::Tensor dst, const at::Tensor& m1, const at::Tensor& m2) {
    at::addmm_out(dst, dst, m1, m2, /*beta=*/0, /*alpha=*/scale);
    return dst;
  };
  const at::Tensor v = at::mm(dys, b);  // (count, rank), unscaled
  if (c.grads.dx.defined() && consecutive) scaled_mm(c.grads.dx.narrow(0, order[0], unit.count), v, a);
  if (c.grads.dx.defined() && !consecutive) {
    c.grads.dx.index_copy_(0, rows, scaled_mm(at::empty({unit.count, a.size(1)}, a.options()), v, a));
  }
  if (c.grads.da.defined()) scaled_mm(c.grads.da.select(0, unit.slot).narrow(0, 0, rank), v.t(), xs);
  if (c.grads.db.defined()) scaled_mm(c.grads.db.select(0, unit.slot).narrow(1, 0, rank), dys.t(), at::mm(xs, a.t()));
}

// Two or more slots with the same row count and rank, as run_gemm_unit computes one, in batched
// GEMMs (gemm_groups.h); the scale multiplies v and u (rounded once more than with alpha).
void run_gemm_group(const BackwardCall& c, const at::Tensor& plan_order, const std::vector<WorkItem>& group) {
  const int64_t rank = c.lora.rank_of(group[0].slot);
  const at::Tensor scales = group_scales(c.lora, group);
  const at::Tensor a = slot_parts(c.lora_a, group, 1, rank);                   // (S, rank, d_in)
  const at::Tensor b_t = slot_parts(c.lora_b.transpose(1, 2), group, 1, rank);  // (S, rank, d_out)
  const GroupRows rows = group_rows(plan_order, group);
  const bool need_v = c.grads.dx.defined() || c.grads.da.defined();
  const at::Tensor dys = rows.of(c.dy);
  const at::Tensor xs = c.grads.da.defined() || c.grads.db.defined() ? rows.of(c.x) : at::Tensor();
  const at::Tensor v = need_v ? at::bmm(dys, b_t.transpose(1, 2)).mul_(scales) : at::Tensor();  // scaled
  if (c.grads.dx.defined() && rows.first >= 0) {
    at::Tensor dx_rows = c.grads.dx.narrow(0, rows.first, rows.slots * rows.count).view({rows.slots, rows.count, -1});
    at::bmm_out(dx_rows, v, a);
  } else if (c.grads.dx.defined()) {
    c.grads.dx.index_copy_(0, rows.index, at::bmm(v, a).view({-1, a.size(2)}));
  }
  if (c.grads.da.defined()) put_slot_parts(c.grads.da, group, 1, rank, at::bmm(v.transpose(1, 2), xs));
  if (c.grads.db.defined()) {  // dB^T = u^T dy, in (S, rank, d_out) like b_t
    const at::Tensor u = at::bmm(xs, a.transpose(1, 2)).mul_(scales);
    put_slot_parts(c.grads.db.transpose(1, 2), group, 1, rank, at::bmm(u.transpose(1, 2), dys));
  }
}

// Zeroes what no unit writes: weight gradients beyond each slot's rank (all of a slot without
// rows), so the gradient of every stacked buffer is defined everywhere.
void zero_unwritten(const BackwardCall& c, const std::vector<bool>& has_unit) {
  for (int64_t s = 0; s < c.lora.sizes.slots; ++s) {
    const int64_t rank = has_unit[s] ? c.lora.rank_of(s) : 0;
    const int64_t rest = c.lora.sizes.max_rank - rank;
    if (rest == 0) continue;
    if (c.grads.da.defined()) c.grads.da.select(0, s).narrow(0, rank, rest).zero_();
    if (c.grads.db.defined()) c.grads.db.select(0, s).narrow(1, rank, rest).zero_();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& slot_ids, const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& ranks,
    const c10::optional<at::Tensor>& plan_arg, std::array<bool, 3> output_mask) {
  const LoraSizes sizes = check_lora_args("lora_backward", x, lora_a, lora_b, slot_ids, scales, ranks, plan_arg);
  check_out("lora_backward", "grad_out", dy, x, sizes);
  check_slot_and_rank_values(slot_ids, ranks, sizes);
  Grads grads;
  if (output_mask[1]) grads.da = at::empty_like(lora_a);
  if (output_mask[2]) grads.db = at::empty_like(lora_b);
  std::vector<bool> has_unit(sizes.slots, false);
  if (sizes.rows == 0 || !(output_mask[0] || output_mask[1] || output_mask[2])) {
    if (output_mask[0]) grads.dx = at::zeros({sizes.rows, sizes.d_in}, x.options());
    zero_unwritten(BackwardCall{dy, x, lora_a, lora_b, LoraCall{x, lora_a, lora_b, grads.dx, scales, ranks, sizes,
                                                                 false}, grads}, has_unit);
    return {grads.dx, grads.da, grads.db};
  }
  const at::Tensor plan = plan_for(slot_ids, plan_arg, sizes);
  const PlanLayout layout{sizes.rows, sizes.slots};
  const int32_t* offsets = plan.data_ptr<int32_t>() + layout.offsets();
  const at::Tensor plan_order = plan.narrow(0, layout.order(), sizes.rows);
  at::Tensor unused_out;
  const LoraCall lora{x, lora_a, lora_b, unused_out, scales, ranks, sizes, /*accumulate=*/false};
  const BackwardCall call{dy, x, lora_a, lora_b, lora, grads};

  std::vector<WorkItem> units, gemm_units;
  const int64_t gemm_rows = setting(Setting::kCpuBackwardGemmMinRows);
  int64_t written_rows = 0;  // dx rows some unit writes (each unit writes all of its rows)
  for (int64_t s = 0; s < sizes.slots; ++s) {
    const int64_t count = offsets[s + 1] - offsets[s];
    if (count == 0 || lora.rank_of(s) == 0) continue;
    has_unit[s] = true;
    written_rows += count;
    (count >= gemm_rows ? gemm_units : units).push_back({s, offsets[s], count});
  }
  // dx is zeroed only when some row has no adapter here (base rows, rank-0 slots): a training
  // batch whose rows all train skips a pass over rows x d_in.
  if (output_mask[0]) {
    grads.dx = written_rows == sizes.rows ? at::empty({sizes.rows, sizes.d_in}, x.options())
                                          : at::zeros({sizes.rows, sizes.d_in}, x.options());
  }
  zero_unwritten(call, has_unit);
  if (!gemm_units.empty()) count_path(KernelPath::kCpuGemmSegments);
  const GemmGroups groups = group_gemm_work(lora, gemm_units);
  if (!groups.batched.empty()) count_path(KernelPath::kCpuGemmBatched);
  for (const std::vector<WorkItem>& group : groups.batched) run_gemm_group(call, plan_order, group);
  for (const WorkItem& unit : groups.single) run_gemm_unit(call, plan_order, unit);
  if (units.empty()) return {grads.dx, grads.da, grads.db};
  count_path(choose_item_kernels(x.scalar_type(), item_args(lora, plan_order.data_ptr<int32_t>(), units[0])).path);
  const int32_t* order = plan_order.data_ptr<int32_t>();
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
    run_units(call, units, begin, end, order);
  });
  return {grads.dx, grads.da, grads.db};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) { m.impl("lora_backward", &lora_backward_cpu); }

}  // namespace cpu
}  // namespace lora_ext
