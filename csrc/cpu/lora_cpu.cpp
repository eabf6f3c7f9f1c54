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

#include <omp.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu/base_gemm.h"
#include "cpu/item_kernels.h"
#include "lora_args.h"
#include "plan.h"

namespace lora_ext {

at::Tensor build_plan_cpu(const at::Tensor& slot_ids, int64_t num_slots);

namespace cpu {
namespace {

constexpr int64_t kRowBlock = 16;
// With at least this many items per thread, items run whole; with fewer, their parts are split.
constexpr int64_t kWholeItemsPerThread = 4;
// Slots with at least this many rows take the GEMM path (LORA_EXT_CPU_GEMM_MIN_ROWS overrides).
constexpr int64_t kDefaultGemmMinRows = 64;

int64_t gemm_min_rows() {
  const char* value = std::getenv("LORA_EXT_CPU_GEMM_MIN_ROWS");
  return value != nullptr ? std::atoll(value) : kDefaultGemmMinRows;
}

// LORA_EXT_CPU_ISA=portable forces the portable kernels (tests cover both that way).
bool portable_forced() {
  const char* isa = std::getenv("LORA_EXT_CPU_ISA");
  return isa != nullptr && std::strcmp(isa, "portable") == 0;
}

ItemKernels choose_item_kernels(at::ScalarType dtype, const ItemArgs& example) {
  ItemKernels kernels;
  if (!portable_forced() && avx512_item_kernels(dtype, example, &kernels)) return kernels;
  return portable_item_kernels(dtype);
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

// A part of one item: ranks [begin, end) for shrink, or columns [begin, end) for expand.
struct Task {
  int64_t item;
  int64_t begin;
  int64_t end;
};

std::vector<Task> split_items(const std::vector<WorkItem>& items, const std::vector<int64_t>& extent,
                              int64_t step) {
  std::vector<Task> tasks;
  for (int64_t i = 0; i < static_cast<int64_t>(items.size()); ++i) {
    for (int64_t begin = 0; begin < extent[i]; begin += step) {
      tasks.push_back({i, begin, std::min(extent[i], begin + step)});
    }
  }
  return tasks;
}

// Three parallel phases over parts of items, so the work spreads over every thread even when
// the batch has fewer items than threads: rows to float32, shrink by rank groups, expand by
// column chunks. Items without an adapter are zeroed (lora_delta) in the first phase.
void run_items(const Batch& batch, const int32_t* order, const std::vector<WorkItem>& items) {
  const int64_t n = static_cast<int64_t>(items.size());
  std::vector<ItemArgs> args(n);
  std::vector<int64_t> xs_offset(n + 1, 0), u_offset(n + 1, 0), ranks(n), columns(n);
  for (int64_t i = 0; i < n; ++i) {
    args[i] = item_args(batch, order, items[i]);
    ranks[i] = args[i].rank;
    columns[i] = args[i].rank > 0 ? batch.sizes.d_out : 0;
    u_offset[i + 1] = u_offset[i] + args[i].count * args[i].rank;
  }
  const ItemKernels kernels = choose_item_kernels(batch.x.scalar_type(), args[0]);
  for (int64_t i = 0; i < n; ++i) {  // float32 copies of x's rows, for kernels that want them
    const bool wanted = kernels.rows_to_float != nullptr && args[i].rank > 0;
    xs_offset[i + 1] = xs_offset[i] + (wanted ? args[i].count * args[i].d_in : 0);
  }
  thread_local ReusedBuffer xs_buffer, u_buffer;
  float* xs = xs_buffer.get(xs_offset[n]);
  float* u = u_buffer.get(u_offset[n]);
  // Small work (zeroing rows, converting few rows) runs inline rather than waking the pool.
  const int64_t rows_grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, xs_offset[n] / n));
  at::parallel_for(0, n, xs_offset[n] == 0 ? n : rows_grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (items[i].slot < 0) {
        zero_rows(batch, order, items[i]);
      } else if (kernels.rows_to_float != nullptr && args[i].rank > 0) {
        kernels.rows_to_float(args[i], xs + xs_offset[i]);
      }
    }
  });
  if (n >= kWholeItemsPerThread * at::get_num_threads()) {
    // Enough items for every thread: each thread runs a contiguous range of whole items. Items
    // come in slot order, so a thread streams through neighbouring slots' A and B and the
    // hardware prefetcher follows; a burst of software prefetches for all of B at each item's
    // start only got in its way (15-18% slower; benchmarks/NOTES.md).
    for (ItemArgs& item : args) item.prefetch_b = false;
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (ranks[i] == 0) continue;
        kernels.shrink(args[i], xs + xs_offset[i], 0, ranks[i], u + u_offset[i]);
        kernels.expand(args[i], u + u_offset[i], 0, columns[i]);
      }
    });
    return;
  }
  const std::vector<Task> shrink_tasks = split_items(items, ranks, kRankGroup);
  at::parallel_for(0, static_cast<int64_t>(shrink_tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Task& task = shrink_tasks[t];
      kernels.shrink(args[task.item], xs + xs_offset[task.item], task.begin, task.end,
                     u + u_offset[task.item]);
    }
  });
  const std::vector<Task> expand_tasks = split_items(items, columns, kColumnChunk);
  at::parallel_for(0, static_cast<int64_t>(expand_tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Task& task = expand_tasks[t];
      kernels.expand(args[task.item], u + u_offset[task.item], task.begin, task.end);
    }
  });
}

// The work of one call: items for the item kernels, segments for the GEMM path.
struct Work {
  std::vector<WorkItem> items, gemm_segments;
};

Work collect_work(const Batch& batch, const int32_t* offsets, const PlanLayout& layout) {
  Work work;
  const int64_t gemm_rows = gemm_min_rows();
  for (int64_t bin = 0; bin <= layout.no_adapter_bin(); ++bin) {
    const int64_t begin = offsets[bin], end = offsets[bin + 1];
    if (begin == end) continue;
    const bool no_work = bin == layout.no_adapter_bin() || batch.rank_of(bin) == 0;  // zero rows
    if (no_work) {
      if (!batch.accumulate) work.items.push_back({-1, begin, end - begin});
    } else if (end - begin >= gemm_rows) {
      work.gemm_segments.push_back({bin, begin, end - begin});
    } else {
      for (int64_t first = begin; first < end; first += kRowBlock) {
        work.items.push_back({bin, first, std::min(kRowBlock, end - first)});
      }
    }
  }
  return work;
}

// The plan of a call: the given one, or one built here.
at::Tensor plan_for(const at::Tensor& slot_ids, const c10::optional<at::Tensor>& plan_arg, const LoraSizes& sizes) {
  return plan_arg.has_value() ? *plan_arg : build_plan_cpu(slot_ids, sizes.slots);
}

void run_lora_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
                  const at::Tensor& lora_b, const at::Tensor& slot_ids,
                  const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& ranks,
                  const c10::optional<at::Tensor>& plan_arg, const LoraSizes& sizes,
                  bool accumulate) {
  check_slot_and_rank_values(slot_ids, ranks, sizes);
  if (sizes.rows == 0) return;
  const at::Tensor plan = plan_for(slot_ids, plan_arg, sizes);
  const PlanLayout layout{sizes.rows, sizes.slots};
  const at::Tensor plan_order = plan.narrow(0, layout.order(), sizes.rows);
  const Batch batch{x, lora_a, lora_b, out, scales, ranks, sizes, accumulate};
  const Work work = collect_work(batch, plan.data_ptr<int32_t>() + layout.offsets(), layout);
  for (const WorkItem& seg : work.gemm_segments) run_gemm_segment(batch, plan_order, seg);
  if (!work.items.empty()) run_items(batch, plan_order.data_ptr<int32_t>(), work.items);
}

// ---- linear_lora: the base layer and the delta in one pass ------------------------------------

// Batches of up to 32 rows run fused, and up to 64 rows when d_in <= 4096: there the fused GEMM
// measured faster than ATen's (0.5-0.9x its time); beyond, ATen's GEMM then add_lora_ is the
// better plan (benchmarks/NOTES.md).
bool fused_gemm_shape(int64_t rows, int64_t d_in) { return rows <= 32 || (rows <= 64 && d_in <= 4096); }

// The first item of each thread's share, splitting the items' adapter bytes evenly.
std::vector<int64_t> split_by_bytes(const std::vector<ItemArgs>& args, int64_t threads) {
  std::vector<int64_t> prefix(args.size() + 1, 0);
  for (size_t i = 0; i < args.size(); ++i) {
    prefix[i + 1] = prefix[i] + args[i].rank * (args[i].d_in + args[i].d_out);
  }
  std::vector<int64_t> first(threads + 1, static_cast<int64_t>(args.size()));
  for (int64_t t = 0, i = 0; t < threads; ++t) {
    while (prefix[i] * threads < prefix.back() * t) ++i;
    first[t] = i;
  }
  return first;
}

// One parallel region: each thread computes its columns of x W^T + bias, then, after a barrier
// (every column of every row is written), adds the deltas of its share of the items.
void run_fused_linear(const BaseGemmArgs& gemm, const Batch& batch, const int32_t* order,
                      const std::vector<WorkItem>& items, const ItemKernels& kernels) {
  const int64_t n = static_cast<int64_t>(items.size());
  std::vector<ItemArgs> args(n);
  std::vector<int64_t> u_offset(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    args[i] = item_args(batch, order, items[i]);
    args[i].prefetch_b = false;  // whole items, as in run_items
    u_offset[i + 1] = u_offset[i] + args[i].count * args[i].rank;
  }
  thread_local ReusedBuffer u_buffer;
  float* u = u_buffer.get(u_offset[n]);
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const std::vector<int64_t> first = split_by_bytes(args, threads);
    base_gemm_columns(gemm, gemm.n * t / threads, gemm.n * (t + 1) / threads);
#pragma omp barrier
    for (int64_t i = first[t]; i < first[t + 1]; ++i) {
      if (args[i].rank == 0) continue;
      kernels.shrink(args[i], nullptr, 0, args[i].rank, u + u_offset[i]);
      kernels.expand(args[i], u + u_offset[i], 0, args[i].d_out);
    }
  }
}

// Whether linear_lora runs fused here: float32, unit strides along rows, decode-sized batches
// whose slots all take the item path, AVX-512 item kernels that read x directly.
bool fused_linear_fits(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const LoraSizes& sizes, const Work& work, const ItemKernels& kernels) {
  const bool float32 = x.scalar_type() == at::kFloat;
  const bool strides = x.stride(1) == 1 && weight.stride(1) == 1 && (!bias || bias->stride(0) == 1);
  const bool shapes = fused_gemm_shape(sizes.rows, sizes.d_in) && work.gemm_segments.empty();
  // LORA_EXT_CPU_NO_FUSED_LINEAR=1 turns fusion off (tests compare both paths that way).
  const bool items_direct = kernels.rows_to_float == nullptr && std::getenv("LORA_EXT_CPU_NO_FUSED_LINEAR") == nullptr;
  return float32 && strides && shapes && items_direct && cpu_has_avx512() && !portable_forced();
}

at::Tensor linear_lora_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& slot_ids,
                           const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& ranks,
                           const c10::optional<at::Tensor>& plan_arg) {
  const LoraSizes sizes = check_lora_args("linear_lora", x, lora_a, lora_b, slot_ids, scales, ranks, plan_arg);
  check_linear_args(x, weight, bias, sizes);
  check_slot_and_rank_values(slot_ids, ranks, sizes);
  at::Tensor out = at::empty({sizes.rows, sizes.d_out}, x.options());
  if (sizes.rows == 0) return out;
  const at::Tensor plan = plan_for(slot_ids, plan_arg, sizes);
  const PlanLayout layout{sizes.rows, sizes.slots};
  const int32_t* order = plan.data_ptr<int32_t>() + layout.order();
  const Batch batch{x, lora_a, lora_b, out, scales, ranks, sizes, /*accumulate=*/true};
  const Work work = collect_work(batch, plan.data_ptr<int32_t>() + layout.offsets(), layout);
  const ItemKernels kernels = work.items.empty() ? ItemKernels{} : choose_item_kernels(x.scalar_type(),
                                                                                     item_args(batch, order, work.items[0]));
  if (!fused_linear_fits(x, weight, bias, sizes, work, kernels)) {
    out = at::linear(x, weight, bias);
    const Batch unfused{x, lora_a, lora_b, out, scales, ranks, sizes, /*accumulate=*/true};
    for (const WorkItem& seg : work.gemm_segments) {
      run_gemm_segment(unfused, plan.narrow(0, layout.order(), sizes.rows), seg);
    }
    if (!work.items.empty()) run_items(unfused, order, work.items);
    return out;
  }
  const BaseGemmArgs gemm{x.data_ptr<float>(), x.stride(0), weight.data_ptr<float>(), weight.stride(0),
                          bias ? bias->data_ptr<float>() : nullptr, out.data_ptr<float>(), out.stride(0),
                          sizes.rows, sizes.d_out, sizes.d_in};
  run_fused_linear(gemm, batch, order, work.items, kernels);
  return out;
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
  m.impl("linear_lora", &linear_lora_cpu);
}

}  // namespace cpu
}  // namespace lora_ext
