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

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"
#include "cpu/amx_deltas.h"
#include "cpu/amx_linear.h"
#include "cpu/gemm_groups.h"
#include "cpu/item_kernels.h"
#include "cpu/work.h"
#include "lora_args.h"
#include "plan.h"

namespace lora_ext {

at::Tensor build_plan_cpu(const at::Tensor& slot_ids, int64_t num_slots);

namespace cpu {
namespace {

// With at least this many items per thread, items run whole; with fewer, their parts are split.
constexpr int64_t kWholeItemsPerThread = 4;
// A call with fewer multiply-adds than this (at most 32 KiB of float32 adapter weights) runs on
// the calling thread: waking the pool would cost more than the work (small models, tests).
constexpr int64_t kInlineMacs = int64_t{1} << 13;

// Tasks [0, count) split in contiguous shares over the threads of a parallel region; `t` of `threads`.
inline std::pair<int64_t, int64_t> share(int64_t count, int64_t t, int64_t threads) {
  return {count * t / threads, count * (t + 1) / threads};
}

}  // namespace

bool portable_forced() { return setting(Setting::kCpuIsa) == kCpuIsaPortable; }

ItemKernels choose_item_kernels(at::ScalarType dtype, const ItemArgs& example) {
  ItemKernels kernels;
  if (!portable_forced() && avx512_item_kernels(dtype, example, &kernels)) return kernels;
  return portable_item_kernels(dtype);
}

ItemArgs item_args(const LoraCall& call, const int32_t* order, const WorkItem& item) {
  const at::Tensor &x = call.x, &a = call.lora_a, &b = call.lora_b, &out = call.out;
  const int64_t slot = std::max<int64_t>(item.slot, 0);
  const int64_t elem = x.element_size();
  return ItemArgs{x.data_ptr(), x.stride(0), x.stride(1), order + item.first, item.count,
                  static_cast<const char*>(a.data_ptr()) + slot * a.stride(0) * elem, a.stride(1), a.stride(2),
                  static_cast<const char*>(b.data_ptr()) + slot * b.stride(0) * elem, b.stride(1), b.stride(2),
                  out.defined() ? out.data_ptr() : nullptr, out.defined() ? out.stride(0) : 0,
                  out.defined() ? out.stride(1) : 1, call.sizes.d_in, call.sizes.d_out,
                  item.slot >= 0 ? call.rank_of(slot) : 0, item.slot >= 0 ? call.scale_of(slot) : 0.f,
                  call.accumulate};
}

AmxSegment amx_segment(const LoraCall& call, const WorkItem& item) {
  const at::Tensor &a = call.lora_a, &b = call.lora_b;
  const int64_t elem = a.element_size();
  return AmxSegment{item.first, item.count, call.rank_of(item.slot), call.scale_of(item.slot),
                    static_cast<const char*>(a.data_ptr()) + item.slot * a.stride(0) * elem,
                    static_cast<const char*>(b.data_ptr()) + item.slot * b.stride(0) * elem};
}

namespace {

void zero_rows(const LoraCall& call, const int32_t* order, const WorkItem& item) {
  const at::Tensor& out = call.out;
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

}  // namespace

void run_gemm_segment(const LoraCall& call, const at::Tensor& plan_order, const WorkItem& seg) {
  const int32_t* order = plan_order.data_ptr<int32_t>() + seg.first;
  const int64_t rank = call.rank_of(seg.slot);
  const double scale = call.scale_of(seg.slot);
  const at::Tensor a = call.lora_a.select(0, seg.slot).narrow(0, 0, rank);  // (rank, d_in)
  const at::Tensor b = call.lora_b.select(0, seg.slot).narrow(1, 0, rank);  // (d_out, rank)
  const bool consecutive = order[seg.count - 1] - order[0] == seg.count - 1;  // order ascends
  if (consecutive) {
    const at::Tensor u = at::mm(call.x.narrow(0, order[0], seg.count), a.t());
    at::Tensor out_rows = call.out.narrow(0, order[0], seg.count);
    out_rows.addmm_(u, b.t(), /*beta=*/call.accumulate ? 1 : 0, /*alpha=*/scale);
    return;
  }
  const at::Tensor rows = plan_order.narrow(0, seg.first, seg.count).to(at::kLong);
  const at::Tensor delta = at::mm(at::mm(call.x.index_select(0, rows), a.t()), b.t()).mul_(scale);
  if (call.accumulate) {
    call.out.index_add_(0, rows, delta);
  } else {
    call.out.index_copy_(0, rows, delta);
  }
}

// Two or more slots with the same row count and rank: out[rows of slot s] (+)= (scale_s x A_s^T) B_s^T
// for all of them in two batched GEMMs. u is rounded to the dtype once more than on the one-slot
// path (its scale is applied to u, since a batched GEMM has one alpha for all slots).
void run_gemm_group(const LoraCall& call, const at::Tensor& plan_order, const std::vector<WorkItem>& group) {
  const int64_t rank = call.rank_of(group[0].slot);
  const at::Tensor a = slot_parts(call.lora_a, group, 1, rank);                   // (S, rank, d_in)
  const at::Tensor b_t = slot_parts(call.lora_b.transpose(1, 2), group, 1, rank);  // (S, rank, d_out)
  const GroupRows rows = group_rows(plan_order, group);
  const at::Tensor u = at::bmm(rows.of(call.x), a.transpose(1, 2)).mul_(group_scales(call, group));
  if (rows.first >= 0) {  // in place; with beta = 0 (lora_delta) out's old contents are not read
    call.out.narrow(0, rows.first, rows.slots * rows.count)
        .view({rows.slots, rows.count, call.sizes.d_out})
        .baddbmm_(u, b_t, /*beta=*/call.accumulate ? 1 : 0);
    return;
  }
  const at::Tensor delta = at::bmm(u, b_t).view({-1, call.sizes.d_out});
  if (call.accumulate) {
    call.out.index_add_(0, rows.index, delta);
  } else {
    call.out.index_copy_(0, rows.index, delta);
  }
}

namespace {

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

}  // namespace

void run_whole_items(const ItemKernels& kernels, const std::vector<ItemArgs>& args, int64_t begin, int64_t end,
                     const float* xs, const std::vector<int64_t>& xs_offset, float* u,
                     const std::vector<int64_t>& u_offset) {
  auto run_one = [&](int64_t i) {
    kernels.shrink(args[i], xs != nullptr ? xs + xs_offset[i] : nullptr, 0, args[i].rank, u + u_offset[i]);
    kernels.expand(args[i], u + u_offset[i], 0, args[i].d_out);
  };
  std::vector<int64_t> quads;  // items that may run four at a time
  for (int64_t i = begin; i < end; ++i) {
    if (args[i].rank == 0) continue;
    if (kernels.quad != nullptr && quad_fits(args[i])) {
      quads.push_back(i);
    } else {
      run_one(i);
    }
  }
  // Groups of similar ranks, each in descending order as the kernel wants; the last few alone.
  std::stable_sort(quads.begin(), quads.end(), [&](int64_t a, int64_t b) { return args[a].rank > args[b].rank; });
  const size_t grouped = quads.size() - quads.size() % kQuadItems;
  if (grouped > 0) count_path(KernelPath::kCpuItemsQuad);
  for (size_t j = 0; j < grouped; j += kQuadItems) {
    const ItemArgs* group[kQuadItems];
    float* group_u[kQuadItems];
    for (int g = 0; g < kQuadItems; ++g) {
      group[g] = &args[quads[j + g]];
      group_u[g] = u + u_offset[quads[j + g]];
    }
    kernels.quad(group, group_u);
  }
  for (size_t j = grouped; j < quads.size(); ++j) run_one(quads[j]);
}

// Three parallel phases over parts of items, so the work spreads over every thread even when
// the batch has fewer items than threads: rows to float32, shrink by rank groups, expand by
// column chunks. Items without an adapter are zeroed (lora_delta) in the first phase.
void run_items(const LoraCall& call, const int32_t* order, const std::vector<WorkItem>& items) {
  const int64_t n = static_cast<int64_t>(items.size());
  std::vector<ItemArgs> args(n);
  std::vector<int64_t> xs_offset(n + 1, 0), u_offset(n + 1, 0), ranks(n), columns(n);
  for (int64_t i = 0; i < n; ++i) {
    args[i] = item_args(call, order, items[i]);
    ranks[i] = args[i].rank;
    columns[i] = args[i].rank > 0 ? call.sizes.d_out : 0;
    u_offset[i + 1] = u_offset[i] + args[i].count * args[i].rank;
  }
  const ItemKernels kernels = choose_item_kernels(call.x.scalar_type(), args[0]);
  const bool lora_work = std::any_of(args.begin(), args.end(), [](const ItemArgs& a) { return a.rank > 0; });
  if (lora_work) count_path(kernels.path);  // not for a call that only zeroes rows
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
        zero_rows(call, order, items[i]);
      } else if (kernels.rows_to_float != nullptr && args[i].rank > 0) {
        kernels.rows_to_float(args[i], xs + xs_offset[i]);
      }
    }
  });
  int64_t macs = 0;
  for (const ItemArgs& a : args) macs += a.count * a.rank * (a.d_in + a.d_out);
  const int64_t threads = at::get_num_threads();
  if (macs < kInlineMacs || threads == 1 || at::in_parallel_region()) {
    run_whole_items(kernels, args, 0, n, xs, xs_offset, u, u_offset);
    return;
  }
  if (n >= kWholeItemsPerThread * threads) {
    // Enough items for every thread: each thread runs a contiguous range of whole items, decode
    // items four at a time (run_whole_items). A burst of software prefetches for all of B at each
    // item's start only got in the hardware prefetcher's way there (slower; benchmarks/NOTES.md).
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      run_whole_items(kernels, args, begin, end, xs, xs_offset, u, u_offset);
    });
    return;
  }
  // Split items, in one parallel region: the shrink tasks (each asks for its share of B, which
  // the expand tasks read next), a barrier, the expand tasks.
  if (lora_work) count_path(KernelPath::kCpuItemsSplit);
  for (ItemArgs& item : args) item.prefetch_b = true;
  const std::vector<Task> shrink_tasks = split_items(items, ranks, kShrinkTaskRanks);
  const std::vector<Task> expand_tasks = split_items(items, columns, kExpandTaskColumns);
#pragma omp parallel num_threads(threads)
  {
    const int64_t team = omp_get_num_threads(), t = omp_get_thread_num();
    const auto shrinks = share(static_cast<int64_t>(shrink_tasks.size()), t, team);
    for (int64_t i = shrinks.first; i < shrinks.second; ++i) {
      const Task& task = shrink_tasks[i];
      kernels.shrink(args[task.item], xs + xs_offset[task.item], task.begin, task.end, u + u_offset[task.item]);
    }
#pragma omp barrier
    const auto expands = share(static_cast<int64_t>(expand_tasks.size()), t, team);
    for (int64_t i = expands.first; i < expands.second; ++i) {
      const Task& task = expand_tasks[i];
      kernels.expand(args[task.item], u + u_offset[task.item], task.begin, task.end);
    }
  }
}

Work collect_work(const LoraCall& call, const int32_t* offsets, const PlanLayout& layout) {
  Work work;
  const int64_t gemm_rows = setting(Setting::kCpuGemmMinRows);
  for (int64_t bin = 0; bin <= layout.no_adapter_bin(); ++bin) {
    const int64_t begin = offsets[bin], end = offsets[bin + 1];
    if (begin == end) continue;
    const bool no_work = bin == layout.no_adapter_bin() || call.rank_of(bin) == 0;  // zero rows
    if (no_work) {
      if (!call.accumulate) work.items.push_back({-1, begin, end - begin});
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

at::Tensor plan_for(const at::Tensor& slot_ids, const c10::optional<at::Tensor>& plan_arg, const LoraSizes& sizes) {
  return plan_arg.has_value() ? *plan_arg : build_plan_cpu(slot_ids, sizes.slots);
}

namespace {

// Whether the call's GEMM segments run on the tile unit (amx_deltas.h): bfloat16 where the AMX
// path is on, with unit strides along x's, A's and out's rows.
bool amx_segments_fit(const LoraCall& call) {
  return call.x.scalar_type() == at::kBFloat16 && amx_path_on() && !portable_forced() && call.x.stride(1) == 1 &&
         call.lora_a.stride(2) == 1 && call.out.stride(1) == 1;
}

void run_amx_segments(const LoraCall& call, const int32_t* order, const std::vector<WorkItem>& segments) {
  const at::Tensor &x = call.x, &a = call.lora_a, &b = call.lora_b, &out = call.out;
  AmxDeltaArgs args{x.data_ptr(), x.stride(0), x.size(0), out.data_ptr(), out.stride(0), order,
                    call.sizes.d_in, call.sizes.d_out, a.stride(1), b.stride(1), b.stride(2), call.accumulate, {}};
  for (const WorkItem& seg : segments) args.segments.push_back(amx_segment(call, seg));
  amx_segment_deltas(args);
}

}  // namespace

void run_work(const LoraCall& call, const at::Tensor& plan, const PlanLayout& layout, const Work& work) {
  const at::Tensor plan_order = plan.narrow(0, layout.order(), call.sizes.rows);
  if (!work.gemm_segments.empty()) count_path(KernelPath::kCpuGemmSegments);
  if (!work.gemm_segments.empty() && amx_segments_fit(call)) {
    count_path(KernelPath::kCpuGemmAmx);
    run_amx_segments(call, plan_order.data_ptr<int32_t>(), work.gemm_segments);
  } else {
    const GemmGroups groups = group_gemm_work(call, work.gemm_segments);
    if (!groups.batched.empty()) count_path(KernelPath::kCpuGemmBatched);
    for (const std::vector<WorkItem>& group : groups.batched) run_gemm_group(call, plan_order, group);
    for (const WorkItem& seg : groups.single) run_gemm_segment(call, plan_order, seg);
  }
  if (!work.items.empty()) run_items(call, plan_order.data_ptr<int32_t>(), work.items);
}

namespace {

void run_lora_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
                  const at::Tensor& lora_b, const at::Tensor& slot_ids,
                  const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& ranks,
                  const c10::optional<at::Tensor>& plan_arg, const LoraSizes& sizes,
                  bool accumulate) {
  check_slot_and_rank_values(slot_ids, ranks, sizes);
  if (sizes.rows == 0) return;
  const at::Tensor plan = plan_for(slot_ids, plan_arg, sizes);
  const PlanLayout layout{sizes.rows, sizes.slots};
  const LoraCall call{x, lora_a, lora_b, out, scales, ranks, sizes, accumulate};
  run_work(call, plan, layout, collect_work(call, plan.data_ptr<int32_t>() + layout.offsets(), layout));
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
  check_out("add_lora_", "out", out, x, sizes);
  run_lora_cpu(out, x, lora_a, lora_b, slot_ids, scales, ranks, plan, sizes, /*accumulate=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("lora_delta", &lora_delta_cpu);
  m.impl("add_lora_", &add_lora_cpu);
}

}  // namespace cpu
}  // namespace lora_ext
