// lora_delta and add_lora_ on CUDA: argument checks, the choice of kernel path, launches.
//
// Everything here depends only on shapes, dtypes and strides, never on tensor values, so the
// ops never synchronize with the host and are safe to capture in CUDA graphs. Slot ids and ranks
// are not checked on the host (that would synchronize): out-of-range rows get NaN instead.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/launchers.h"
#include "kernel_config.h"
#include "lora_args.h"
#include "plan.h"

namespace lora_ext {
namespace cuda {

at::Tensor build_plan_cuda(const at::Tensor& slot_ids, int64_t num_slots);

namespace {

struct DeviceInfo {
  int sm_count = 0;
  int major = 0;
};

DeviceInfo device_info(int device) {
  static DeviceInfo cache[64];
  DeviceInfo& info = cache[device % 64];
  if (info.sm_count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
  }
  return info;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte vectors of `elems` elements along a contiguous dimension stay aligned for every
// index that is a multiple of `elems`.
bool vectorizable(const at::Tensor& t, int contiguous_dim, int elems) {
  if (t.stride(contiguous_dim) != 1 || !aligned16(t.data_ptr())) return false;
  for (int d = 0; d < t.dim(); ++d) {
    if (d != contiguous_dim && t.size(d) > 1 && t.stride(d) % elems != 0) return false;
  }
  return t.size(contiguous_dim) % elems == 0;
}

// The cuda_kernel setting "simt" or "mma" forces a path (tests use it to cover both); "auto" picks
// tensor cores when rows per adapter are many (prefill) and CUDA cores otherwise (decode).
KernelPath choose_path(const LoraSizes& s, at::ScalarType dtype, bool shrink_vectorizable,
                       const DeviceInfo& dev) {
  const bool mma_possible = dtype != at::kFloat && dev.major >= 8 && shrink_vectorizable;
  const int64_t forced = setting(Setting::kCudaKernel);
  if (forced == kCudaSimt) return KernelPath::kCudaSimt;
  if (forced == kCudaMma) return mma_possible ? KernelPath::kCudaMma : KernelPath::kCudaSimt;
  const int64_t busy_slots = std::min(s.rows, s.slots);
  const bool many_rows_per_adapter = s.rows >= kPrefillTileRows && s.rows >= 16 * busy_slots;
  return mma_possible && many_rows_per_adapter ? KernelPath::kCudaMma : KernelPath::kCudaSimt;
}

// Splits of d_in so that shrink launches a few blocks per SM; each split a multiple of `granule`.
struct SplitK {
  int splits;
  int k_chunk;
};

SplitK choose_split_k(int64_t d_in, int64_t expected_tiles, int64_t min_chunk, int64_t granule,
                      int sm_count) {
  const int64_t wanted = (4 * sm_count + expected_tiles - 1) / std::max<int64_t>(expected_tiles, 1);
  const int64_t most = std::max<int64_t>(1, d_in / min_chunk);
  const int64_t splits = std::max<int64_t>(1, std::min(wanted, most));
  int64_t chunk = (d_in + splits - 1) / splits;
  chunk = (chunk + granule - 1) / granule * granule;
  return {static_cast<int>((d_in + chunk - 1) / chunk), static_cast<int>(chunk)};
}

BLayout choose_b_layout(const at::Tensor& b, int elems) {
  if (vectorizable(b, 1, elems)) return BLayout::kOutContiguous;
  if (vectorizable(b, 2, elems)) return BLayout::kRankContiguous;
  return BLayout::kGeneric;
}

template <typename scalar_t>
void launch_all(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
                const at::Tensor& lora_b, const at::Tensor& plan, const SlotParams& slots,
                const LoraSizes& s, bool accumulate, const DeviceInfo& dev, cudaStream_t stream) {
  using T = typename DeviceType<scalar_t>::type;
  constexpr int E = 16 / sizeof(T);
  const bool shrink_vec = vectorizable(x, 1, E) && vectorizable(lora_a, 2, E);
  const KernelPath path = choose_path(s, x.scalar_type(), shrink_vec, dev);
  count_path(path);
  const int64_t tile_rows = path == KernelPath::kCudaMma ? kPrefillTileRows : kDecodeTileRows;
  const int64_t expected_tiles = std::max(std::min(s.rows, s.slots), (s.rows + tile_rows - 1) / tile_rows);
  const SplitK split = path == KernelPath::kCudaMma
                           ? choose_split_k(s.d_in, expected_tiles, 256, 32, dev.sm_count)
                           : choose_split_k(s.d_in, expected_tiles, kSimtThreads * E, E, dev.sm_count);
  at::Tensor partial = at::empty({split.splits, s.rows, s.max_rank}, x.options().dtype(at::kFloat));

  const PlanLayout layout{s.rows, s.slots};
  const int32_t* p = plan.data_ptr<int32_t>();
  const int32_t* tiles = p + (path == KernelPath::kCudaMma ? layout.prefill_tiles() : layout.decode_tiles());
  const PlanView view{p + layout.offsets(), tiles, p + layout.order(), static_cast<int>(s.slots)};

  ShrinkArgs<T> shrink{reinterpret_cast<const T*>(x.data_ptr<scalar_t>()), x.stride(0), x.stride(1),
                       reinterpret_cast<const T*>(lora_a.data_ptr<scalar_t>()), lora_a.stride(0),
                       lora_a.stride(1), lora_a.stride(2), static_cast<int>(s.d_in), split.k_chunk,
                       partial.data_ptr<float>(), static_cast<int>(s.rows),
                       static_cast<int>(s.max_rank), view, slots};
  const bool out_vec = vectorizable(out, 1, E);
  ExpandArgs<T> expand{partial.data_ptr<float>(), split.splits, static_cast<int>(s.rows),
                       static_cast<int>(s.max_rank), reinterpret_cast<const T*>(lora_b.data_ptr<scalar_t>()),
                       lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
                       reinterpret_cast<T*>(out.data_ptr<scalar_t>()), out.stride(0), out.stride(1),
                       out_vec, static_cast<int>(s.d_out), accumulate, view, slots};
  const int shrink_tiles = static_cast<int>(max_tiles(s.rows, s.slots, tile_rows));
  const int expand_tiles = static_cast<int>(max_tiles(s.rows, layout.num_bins(), tile_rows));
  if constexpr (!std::is_same_v<T, float>) {
    if (path == KernelPath::kCudaMma) {
      launch_shrink_mma<T>(shrink, shrink_tiles, split.splits, stream);
      launch_expand_mma<T>(expand, expand_tiles, stream);
      return;
    }
  }
  launch_shrink_simt<T>(shrink, shrink_tiles, split.splits, shrink_vec, stream);
  launch_expand_simt<T>(expand, expand_tiles, choose_b_layout(lora_b, E), stream);
}

}  // namespace

void run_lora_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
                   const at::Tensor& lora_b, const at::Tensor& slot_ids,
                   const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& ranks,
                   const c10::optional<at::Tensor>& plan_arg, const LoraSizes& s, bool accumulate) {
  if (s.rows == 0) return;
  LORA_CHECK(s.rows < (int64_t{1} << 30) && s.d_in < (int64_t{1} << 30) && s.d_out < (int64_t{1} << 30) &&
                 s.rows * s.max_rank < (int64_t{1} << 31),
             "sizes T=", s.rows, ", d_in=", s.d_in, ", d_out=", s.d_out, ", R=", s.max_rank,
             " exceed the 32-bit indexing of the CUDA kernels");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor plan = plan_arg.has_value() ? *plan_arg : build_plan_cuda(slot_ids, s.slots);
  const at::Tensor scales_c = scales.has_value() ? scales->contiguous() : at::Tensor();
  const at::Tensor ranks_c = ranks.has_value() ? ranks->contiguous() : at::Tensor();
  const SlotParams slots{scales_c.defined() ? scales_c.data_ptr<float>() : nullptr,
                         ranks_c.defined() ? ranks_c.data_ptr() : nullptr,
                         ranks_c.defined() && ranks_c.scalar_type() == at::kLong,
                         static_cast<int>(s.max_rank)};
  const DeviceInfo dev = device_info(x.get_device());
  switch (x.scalar_type()) {  // the three dtypes of the contract (checked above)
    case at::kFloat:
      return launch_all<float>(out, x, lora_a, lora_b, plan, slots, s, accumulate, dev, stream);
    case at::kHalf:
      return launch_all<at::Half>(out, x, lora_a, lora_b, plan, slots, s, accumulate, dev, stream);
    default:
      return launch_all<at::BFloat16>(out, x, lora_a, lora_b, plan, slots, s, accumulate, dev, stream);
  }
}

namespace {

at::Tensor lora_delta_cuda(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                           const at::Tensor& slot_ids, const c10::optional<at::Tensor>& scales,
                           const c10::optional<at::Tensor>& ranks,
                           const c10::optional<at::Tensor>& plan) {
  const LoraSizes s = check_lora_args("lora_delta", x, lora_a, lora_b, slot_ids, scales, ranks, plan);
  at::Tensor out = at::empty({s.rows, s.d_out}, x.options());
  run_lora_cuda(out, x, lora_a, lora_b, slot_ids, scales, ranks, plan, s, /*accumulate=*/false);
  return out;
}

void add_lora_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
                   const at::Tensor& lora_b, const at::Tensor& slot_ids,
                   const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& ranks,
                   const c10::optional<at::Tensor>& plan) {
  const LoraSizes s = check_lora_args("add_lora_", x, lora_a, lora_b, slot_ids, scales, ranks, plan);
  check_out("add_lora_", "out", out, x, s);
  run_lora_cuda(out, x, lora_a, lora_b, slot_ids, scales, ranks, plan, s, /*accumulate=*/true);
}

// The base GEMM by cuBLAS, then the delta added in place: on the GPU the two are not fused.
at::Tensor linear_lora_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& slot_ids,
                            const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& ranks,
                            const c10::optional<at::Tensor>& plan) {
  const LoraSizes s = check_lora_args("linear_lora", x, lora_a, lora_b, slot_ids, scales, ranks, plan);
  check_linear_args(x, weight, bias, s);
  at::Tensor out = at::linear(x, weight, bias);
  run_lora_cuda(out, x, lora_a, lora_b, slot_ids, scales, ranks, plan, s, /*accumulate=*/true);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("lora_delta", &lora_delta_cuda);
  m.impl("add_lora_", &add_lora_cuda);
  m.impl("linear_lora", &linear_lora_cuda);
}

}  // namespace cuda
}  // namespace lora_ext
