// lora_delta and add_lora_ on CPU.
//
// Rows are grouped by slot through the batch plan. A slot with many rows (prefill) runs as two
// GEMMs through ATen (oneDNN/MKL, which use AMX or AVX-512 where present); the rest is split into
// work items of at most kRowBlock rows of one slot, run in parallel on the intra-op thread pool by
// the AVX-512 item kernel when the CPU has it, else the portable one. Each item streams its
// adapter's A and B once. Rows and columns beyond a slot's rank are never read.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu/item_kernels.h"
#include "lora_args.h"
#include "plan.h"

namespace lora_ext {

at::Tensor build_plan_cpu(const at::Tensor& slot_ids, int64_t num_slots);

namespace cpu {
namespace {

constexpr int64_t kRowBlock = 16;
// Slots with at least this many rows take the GEMM path (LORA_EXT_CPU_GEMM_MIN_ROWS overrides).
constexpr int64_t kDefaultGemmMinRows = 64;

int64_t gemm_min_rows() {
  const char* value = std::getenv("LORA_EXT_CPU_GEMM_MIN_ROWS");
  return value != nullptr ? std::atoll(value) : kDefaultGemmMinRows;
}

// LORA_EXT_CPU_ISA=portable forces the portable item kernel (tests cover both that way).
ItemKernel choose_item_kernel(at::ScalarType dtype, const ItemArgs& example) {
  const char* isa = std::getenv("LORA_EXT_CPU_ISA");
  if (isa == nullptr || std::strcmp(isa, "portable") != 0) {
    if (ItemKernel kernel = avx512_item_kernel(dtype, example)) return kernel;
  }
  return portable_item_kernel(dtype);
}

struct WorkItem {
  int64_t slot;   // -1: rows without an adapter (or of rank 0) that lora_delta must zero
  int64_t first;  // index into the plan's order
  int64_t count;
};

struct Batch {
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

ItemArgs item_args(const Batch& batch, const int32_t* order, const WorkItem& item) {
  const at::Tensor &x = batch.x, &a = batch.lora_a, &b = batch.lora_b, &out = batch.out;
  const int64_t slot = std::max<int64_t>(item.slot, 0);
  const int64_t elem = x.element_size();
  return ItemArgs{x.data_ptr(), x.stride(0), x.stride(1), order + item.first, item.count,
                  static_cast<const char*>(a.data_ptr()) + slot * a.stride(0) * elem, a.stride(1), a.stride(2),
                  static_cast<const char*>(b.data_ptr()) + slot * b.stride(0) * elem, b.stride(1), b.stride(2),
                  out.data_ptr(), out.stride(0), out.stride(1), batch.sizes.d_in, batch.sizes.d_out,
                  item.slot >= 0 ? batch.rank_of(slot) : 0, item.slot >= 0 ? batch.scale_of(slot) : 0.f,
                  batch.accumulate};
}

void zero_rows(const Batch& batch, const int32_t* order, const WorkItem& item) {
  const at::Tensor& out = batch.out;
  const int64_t elem = out.element_size();
  for (int64_t i = 0; i < item.count; ++i) {
    const int64_t row = order[item.first + i];
    if (out.stride(1) == 1) {  // all-zero bits are 0.0 in float32, float16 and bfloat16
      std::memset(static_cast<char*>(out.data_ptr()) + row * out.stride(0) * elem, 0, out.size(1) * elem);
    } else {
      out.select(0, row).zero_();
    }
  }
}

// out[rows] (+)= scale * (x[rows] @ A[:rank]^T) @ B[:, :rank]^T as two GEMMs.
void run_gemm_segment(const Batch& batch, const at::Tensor& plan_order, const WorkItem& seg) {
  const int32_t* order = plan_order.data_ptr<int32_t>() + seg.first;
  const int64_t rank = batch.rank_of(seg.slot);
  const double scale = batch.scale_of(seg.slot);
  const at::Tensor a = batch.lora_a.select(0, seg.slot).narrow(0, 0, rank);  // (rank, d_in)
  const at::Tensor b = batch.lora_b.select(0, seg.slot).narrow(1, 0, rank);  // (d_out, rank)
  const bool consecutive = order[seg.count - 1] - order[0] == seg.count - 1;  // order ascends
  if (consecutive) {
    const at::Tensor u = at::mm(batch.x.narrow(0, order[0], seg.count), a.t());
    at::Tensor out_rows = batch.out.narrow(0, order[0], seg.count);
    out_rows.addmm_(u, b.t(), /*beta=*/batch.accumulate ? 1 : 0, /*alpha=*/scale);
    return;
  }
  const at::Tensor rows = plan_order.narrow(0, seg.first, seg.count).to(at::kLong);
  const at::Tensor delta = at::mm(at::mm(batch.x.index_select(0, rows), a.t()), b.t()).mul_(scale);
  if (batch.accumulate) {
    batch.out.index_add_(0, rows, delta);
  } else {
    batch.out.index_copy_(0, rows, delta);
  }
}

void run_lora_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
                  const at::Tensor& lora_b, const at::Tensor& slot_ids,
                  const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& ranks,
                  const c10::optional<at::Tensor>& plan_arg, const LoraSizes& sizes,
                  bool accumulate) {
  check_slot_and_rank_values(slot_ids, ranks, sizes);
  if (sizes.rows == 0) return;
  const at::Tensor plan = plan_arg.has_value() ? *plan_arg : build_plan_cpu(slot_ids, sizes.slots);
  const PlanLayout layout{sizes.rows, sizes.slots};
  const int32_t* offsets = plan.data_ptr<int32_t>() + layout.offsets();
  const at::Tensor plan_order = plan.narrow(0, layout.order(), sizes.rows);
  const int32_t* order = plan_order.data_ptr<int32_t>();
  const Batch batch{x, lora_a, lora_b, out, scales, ranks, sizes, accumulate};

  std::vector<WorkItem> items, gemm_segments;
  const int64_t gemm_rows = gemm_min_rows();
  for (int64_t bin = 0; bin <= layout.no_adapter_bin(); ++bin) {
    const int64_t begin = offsets[bin], end = offsets[bin + 1];
    if (begin == end) continue;
    const bool no_work = bin == layout.no_adapter_bin() || batch.rank_of(bin) == 0;
    if (no_work) {
      if (!accumulate) items.push_back({-1, begin, end - begin});
    } else if (end - begin >= gemm_rows) {
      gemm_segments.push_back({bin, begin, end - begin});
    } else {
      for (int64_t first = begin; first < end; first += kRowBlock) {
        items.push_back({bin, first, std::min(kRowBlock, end - first)});
      }
    }
  }
  for (const WorkItem& seg : gemm_segments) run_gemm_segment(batch, plan_order, seg);
  if (items.empty()) return;

  const ItemKernel kernel = choose_item_kernel(x.scalar_type(), item_args(batch, order, items[0]));
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch scratch;
    for (int64_t i = begin; i < end; ++i) {
      if (items[i].slot < 0) {
        zero_rows(batch, order, items[i]);
      } else {
        kernel(item_args(batch, order, items[i]), scratch);
      }
    }
  });
}

at::Tensor lora_delta_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                          const at::Tensor& slot_ids, const c10::optional<at::Tensor>& scales,
                          const c10::optional<at::Tensor>& ranks,
                          const c10::optional<at::Tensor>& plan) {
  const LoraSizes sizes = check_lora_args("lora_delta", x, lora_a, lora_b, slot_ids, scales, ranks, plan);
  at::Tensor out = at::empty({sizes.rows, sizes.d_out}, x.options());
  run_lora_cpu(out, x, lora_a, lora_b, slot_ids, scales, ranks, plan, sizes, /*accumulate=*/false);
  return out;
}

void add_lora_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
                  const at::Tensor& lora_b, const at::Tensor& slot_ids,
                  const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& ranks,
                  const c10::optional<at::Tensor>& plan) {
  const LoraSizes sizes = check_lora_args("add_lora_", x, lora_a, lora_b, slot_ids, scales, ranks, plan);
  check_out(out, x, sizes);
  run_lora_cpu(out, x, lora_a, lora_b, slot_ids, scales, ranks, plan, sizes, /*accumulate=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("lora_delta", &lora_delta_cpu);
  m.impl("add_lora_", &add_lora_cpu);
}

}  // namespace cpu
}  // namespace lora_ext
