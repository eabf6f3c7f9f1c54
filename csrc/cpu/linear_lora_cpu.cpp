// linear_lora on CPU: a patched nn.Linear's base GEMM and its rows' LoRA deltas.
//
// Decode batches run fused (float32 always; bfloat16 and float16 where the rule below says): one
// parallel region in which each thread computes its columns of x W^T + bias with lora_ext's own
// GEMM (base_gemm.h), then, after a barrier, the deltas of its share of the items. Everything else runs ATen's linear, then the deltas as
// add_lora_ would.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <vector>

#include "cpu/amx_linear.h"
#include "cpu/base_gemm.h"
#include "cpu/linear_lora_cpu.h"
#include "cpu/item_kernels.h"
#include "cpu/work.h"
#include "lora_args.h"
#include "plan.h"

namespace lora_ext {
namespace cpu {

// The fusion rule: which dtypes, and how many rows. Fused measured faster than ATen's GEMM then the
// deltas for batches of up to 32 rows, and, when d_in <= 4096, up to 128 rows (float32 from 48 rows
// with the base GEMM on packed blocks of W, as fast as MKL's there; benchmarks/NOTES.md). The
// cpu_fused_linear_max_rows setting replaces that limit when it is not 0.
//
// Dtypes: float32 always; bfloat16 and float16 by the cpu_fused_linear_16bit setting: "auto" fuses
// them where lora_ext has the unit the library's GEMM would use or a faster one (bfloat16: the AMX
// path where the CPU has AMX, else AVX512-BF16; float16: the AMX path from kAmxFloat16MinRows rows,
// else only without AVX512-FP16), "on" always, "off" never. Only with the AVX-512 kernels.

// float16 on the AMX path splits every weight into two bfloat16 parts, a cost per weight whatever
// the rows: below 9 rows ATen's AVX512-FP16 GEMM measured as fast or faster (8 rows level, 1 row
// 10.5 against 17.7 ms per forward in the bench model; from 12 rows the AMX path is faster).
constexpr int64_t kAmxFloat16MinRows = 9;

bool fuses_dtype(at::ScalarType dtype, int64_t rows) {
  if (dtype == at::kFloat) return true;
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  switch (setting(Setting::kCpuFusedLinear16Bit)) {
    case kFused16BitOn:
      return true;
    case kFused16BitOff:
      return false;
    default:
      if (dtype == at::kHalf) return (amx_path_on() && rows >= kAmxFloat16MinRows) || !cpu_has_avx512_fp16();
      return cpu_has_amx_bf16() ? amx_path_on() : cpu_has_avx512_bf16();
  }
}

constexpr int64_t kFusedMaxRows = 128;

bool linear_lora_fuses(int64_t rows, int64_t d_in, at::ScalarType dtype) {
  const int64_t set = setting(Setting::kCpuFusedLinearMaxRows);
  const int64_t max_rows = set > 0 ? set : kFusedMaxRows;
  const bool shape = rows <= std::min<int64_t>(32, max_rows) || (rows <= max_rows && d_in <= 4096);
  return shape && fuses_dtype(dtype, rows) && setting(Setting::kCpuFusedLinear) != 0 && cpu_has_avx512() &&
         !portable_forced();
}

namespace {

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
void run_fused_linear(const BaseGemmArgs& gemm, const LoraCall& call, const int32_t* order,
                      const std::vector<WorkItem>& items, const ItemKernels& kernels) {
  const int64_t n = static_cast<int64_t>(items.size());
  std::vector<ItemArgs> args(n);
  std::vector<int64_t> u_offset(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    args[i] = item_args(call, order, items[i]);
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
    run_whole_items(kernels, args, first[t], first[t + 1], /*xs=*/nullptr, /*xs_offset=*/{}, u, u_offset);
  }
}

// Whether this call runs fused: the fusion rule, unit strides along rows, every slot on the item
// path, and item kernels that read x directly.
bool fused_linear_fits(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const LoraSizes& sizes, const Work& work, const ItemKernels& kernels) {
  const bool strides = x.stride(1) == 1 && weight.stride(1) == 1 && (!bias || bias->stride(0) == 1);
  return linear_lora_fuses(sizes.rows, sizes.d_in, x.scalar_type()) && strides && work.gemm_segments.empty() &&
         kernels.rows_to_float == nullptr;
}

// Whether this call runs fused on the AMX path: the fusion rule for a 16-bit dtype with that path on, and
// unit strides along x's, W's, the bias's and A's rows (any rows per slot, any layout of B).
bool amx_linear_fits(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     const at::Tensor& lora_a, const LoraSizes& sizes) {
  const bool strides = x.stride(1) == 1 && weight.stride(1) == 1 && (!bias || bias->stride(0) == 1) &&
                       lora_a.stride(2) == 1;
  const bool dtype = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  return dtype && amx_path_on() &&
         linear_lora_fuses(sizes.rows, sizes.d_in, x.scalar_type()) && strides;
}

// The AMX path's view of the plan: one segment per slot with rows and a rank above 0; for float16,
// the item kernel that shrinks its small segments.
AmxLoraArgs amx_lora_args(const LoraCall& call, const int32_t* plan, const PlanLayout& layout) {
  const int32_t* offsets = plan + layout.offsets();
  const int32_t* order = plan + layout.order();
  AmxLoraArgs args{order, {}, call.sizes.max_rank, call.lora_a.stride(1), call.lora_b.stride(1), call.lora_b.stride(2)};
  for (int64_t slot = 0; slot < call.sizes.slots; ++slot) {
    const WorkItem rows{slot, offsets[slot], offsets[slot + 1] - offsets[slot]};
    if (rows.count == 0 || call.rank_of(slot) == 0) continue;
    args.segments.push_back(amx_segment(call, rows));
    if (call.x.scalar_type() == at::kHalf) args.items.push_back(item_args(call, order, rows));
  }
  if (!args.items.empty()) {
    const ItemKernels kernels = choose_item_kernels(at::kHalf, args.items[0]);
    if (kernels.rows_to_float == nullptr) args.item_shrink = kernels.shrink;
  }
  return args;
}

// The base layer's GEMM into `out`, a fresh (rows, d_out) tensor.
BaseGemmArgs base_gemm_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            at::Tensor& out, const LoraSizes& sizes) {
  return BaseGemmArgs{x.data_ptr(), x.stride(0), weight.data_ptr(), weight.stride(0),
                      bias ? bias->data_ptr() : nullptr, out.data_ptr(), out.stride(0),
                      sizes.rows, sizes.d_out, sizes.d_in, x.scalar_type()};
}

at::Tensor linear_lora_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& slot_ids,
                           const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& ranks,
                           const c10::optional<at::Tensor>& plan_arg) {
  const LoraSizes sizes = check_lora_args("linear_lora", x, lora_a, lora_b, slot_ids, scales, ranks, plan_arg);
  check_linear_args(x, weight, bias, sizes);
  check_slot_and_rank_values(slot_ids, ranks, sizes);
  if (sizes.rows == 0) return at::empty({0, sizes.d_out}, x.options());
  // Made below by the path taken (`call` holds it by reference): ATen's linear makes its own.
  at::Tensor out;
  const at::Tensor plan = plan_for(slot_ids, plan_arg, sizes);
  const PlanLayout layout{sizes.rows, sizes.slots};
  const int32_t* order = plan.data_ptr<int32_t>() + layout.order();
  const LoraCall call{x, lora_a, lora_b, out, scales, ranks, sizes, /*accumulate=*/true};
  if (amx_linear_fits(x, weight, bias, lora_a, sizes)) {
    out = at::empty({sizes.rows, sizes.d_out}, x.options());
    count_path(KernelPath::kCpuLinearFused);
    count_path(KernelPath::kCpuLinearAmx);
    amx_linear_lora(base_gemm_args(x, weight, bias, out, sizes), amx_lora_args(call, plan.data_ptr<int32_t>(), layout));
    return out;
  }
  const Work work = collect_work(call, plan.data_ptr<int32_t>() + layout.offsets(), layout);
  const ItemKernels kernels = work.items.empty() ? ItemKernels{} : choose_item_kernels(x.scalar_type(),
                                                                                     item_args(call, order, work.items[0]));
  if (!fused_linear_fits(x, weight, bias, sizes, work, kernels)) {
    count_path(KernelPath::kCpuLinearUnfused);
    // at::linear rather than at::linear_out into a tensor made here: the out variant measured
    // slower (benchmarks/NOTES.md).
    out = at::linear(x, weight, bias);
    run_work(call, plan, layout, work);
    return out;
  }
  out = at::empty({sizes.rows, sizes.d_out}, x.options());
  count_path(KernelPath::kCpuLinearFused);
  if (!work.items.empty()) count_path(kernels.path);
  const BaseGemmArgs gemm = base_gemm_args(x, weight, bias, out, sizes);
  if (packed_gemm_fits(gemm)) count_path(KernelPath::kCpuLinearPacked);
  run_fused_linear(gemm, call, order, work.items, kernels);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) { m.impl("linear_lora", &linear_lora_cpu); }

}  // namespace cpu
}  // namespace lora_ext
