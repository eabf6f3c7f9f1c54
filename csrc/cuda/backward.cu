// lora_backward on CUDA (the math is in csrc/cpu/lora_backward_cpu.cpp's header):
//   dx   the forward kernels with the roles of A and B swapped: lora_delta(dy, B^T, A^T)
//   u, v per-row low-rank products (u_t = A_s x_t, v_t = B_s^T dy_t), one warp per rank
//   dA   per slot, sum over the slot's rows of v_t x_t^T, scaled; dB likewise with dy_t u_t^T
// Every launch depends only on shapes (no host synchronization). Slots without rows get zero
// gradients, ranks beyond a slot's rank zero, and a slot whose rank is invalid NaN (ranks are not
// checked on the host). These kernels favour simplicity over speed; they are not tuned yet.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "cuda/common.cuh"
#include "cuda/launchers.h"
#include "lora_args.h"
#include "plan.h"

namespace lora_ext {
namespace cuda {

at::Tensor build_plan_cuda(const at::Tensor& slot_ids, int64_t num_slots);

namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;

// A slot's row of weights: w + slot * slot_stride + j * rank_stride + n * col_stride.
template <typename T>
struct Weights {
  const T* w;
  int64_t slot_stride, rank_stride, col_stride;
};

// out[t, j] = sum_n W[slot(t), j, n] * y[t, n] for j < rank(slot(t)), unscaled float32 (out: T x R);
// rows without a valid slot are left as they are (never read).
template <typename T>
__global__ void __launch_bounds__(kThreads)
row_products_kernel(const T* y, int64_t y_row_stride, int64_t y_col_stride, int width, Weights<T> weights,
                    PlanView plan, SlotParams slots, int rows, float* out) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int bin = 0; bin < plan.num_slots; ++bin) {
    const int rank = slots.rank(bin);
    for (int idx = plan.offsets[bin] + blockIdx.x; idx < plan.offsets[bin + 1]; idx += gridDim.x) {
      const int t = plan.order[idx];
      for (int j = warp; j < rank; j += kWarpsPerBlock) {
        const T* w = weights.w + bin * weights.slot_stride + j * weights.rank_stride;
        float sum = 0.f;
        for (int n = lane; n < width; n += kWarp) {
          sum += to_float(w[n * weights.col_stride]) * to_float(y[t * y_row_stride + n * y_col_stride]);
        }
        sum = warp_sum(sum);
        if (lane == 0) out[static_cast<int64_t>(t) * slots.max_rank + j] = sum;
      }
    }
  }
}

// grad[s, j, n] = scale_s * sum over the rows t of slot s of w[t, j] * y[t, n] for j < rank_s, zero
// for j >= rank_s or a slot without rows, NaN for a slot with an invalid rank. Block (x, y): 256
// columns of slot y.
template <typename T>
__global__ void __launch_bounds__(kThreads)
slot_outer_kernel(const T* y, int64_t y_row_stride, int64_t y_col_stride, int width, const float* w,
                  Weights<T> grad, PlanView plan, SlotParams slots) {
  const int n = blockIdx.x * kThreads + threadIdx.x;
  if (n >= width) return;
  for (int s = blockIdx.y; s < plan.num_slots; s += gridDim.y) {
    const int rank = slots.rank(s);
    const float scale = slots.scale(s);
    const int first = plan.offsets[s], last = plan.offsets[s + 1];
    T* g = const_cast<T*>(grad.w) + s * grad.slot_stride + n * grad.col_stride;
    for (int j = 0; j < slots.max_rank; ++j) {
      float value = 0.f;
      if (rank < 0) {
        value = __int_as_float(0x7fc00000);
      } else if (j < rank) {
        for (int idx = first; idx < last; ++idx) {
          const int t = plan.order[idx];
          value = fmaf(w[static_cast<int64_t>(t) * slots.max_rank + j], to_float(y[t * y_row_stride + n * y_col_stride]),
                       value);
        }
        value *= scale;
      }
      g[j * grad.rank_stride] = from_float<T>(value);
    }
  }
}

template <typename T>
Weights<T> weights_of(const at::Tensor& t, int rank_dim, int col_dim) {
  return {reinterpret_cast<const T*>(t.data_ptr()), t.stride(0), t.stride(rank_dim), t.stride(col_dim)};
}

template <typename scalar_t>
void weight_grads(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                  const at::Tensor& plan, const SlotParams& slots, const LoraSizes& s, at::Tensor& da,
                  at::Tensor& db, cudaStream_t stream) {
  using T = typename DeviceType<scalar_t>::type;
  const PlanLayout layout{s.rows, s.slots};
  const int32_t* p = plan.data_ptr<int32_t>();
  const PlanView view{p + layout.offsets(), p + layout.decode_tiles(), p + layout.order(), static_cast<int>(s.slots)};
  const int row_blocks = static_cast<int>(std::min<int64_t>(s.rows, 4096));
  const int slot_blocks = static_cast<int>(std::min<int64_t>(s.slots, 65535));
  const T* x_ptr = reinterpret_cast<const T*>(x.data_ptr());
  const T* dy_ptr = reinterpret_cast<const T*>(dy.data_ptr());
  if (da.defined()) {  // v = B^T dy, then dA = scale * v^T x
    at::Tensor v = at::zeros({s.rows, s.max_rank}, x.options().dtype(at::kFloat));
    row_products_kernel<T><<<row_blocks, kThreads, 0, stream>>>(
        dy_ptr, dy.stride(0), dy.stride(1), static_cast<int>(s.d_out), weights_of<T>(lora_b, 2, 1), view, slots,
        static_cast<int>(s.rows), v.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid((s.d_in + kThreads - 1) / kThreads, slot_blocks);
    slot_outer_kernel<T><<<grid, kThreads, 0, stream>>>(x_ptr, x.stride(0), x.stride(1), static_cast<int>(s.d_in),
                                                        v.data_ptr<float>(), weights_of<T>(da, 1, 2), view, slots);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (db.defined()) {  // u = A x, then dB = scale * dy u^T
    at::Tensor u = at::zeros({s.rows, s.max_rank}, x.options().dtype(at::kFloat));
    row_products_kernel<T><<<row_blocks, kThreads, 0, stream>>>(
        x_ptr, x.stride(0), x.stride(1), static_cast<int>(s.d_in), weights_of<T>(lora_a, 1, 2), view, slots,
        static_cast<int>(s.rows), u.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid((s.d_out + kThreads - 1) / kThreads, slot_blocks);
    slot_outer_kernel<T><<<grid, kThreads, 0, stream>>>(dy_ptr, dy.stride(0), dy.stride(1), static_cast<int>(s.d_out),
                                                        u.data_ptr<float>(), weights_of<T>(db, 2, 1), view, slots);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& slot_ids, const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& ranks,
    const c10::optional<at::Tensor>& plan_arg, std::array<bool, 3> output_mask) {
  const LoraSizes s = check_lora_args("lora_backward", x, lora_a, lora_b, slot_ids, scales, ranks, plan_arg);
  check_out("lora_backward", "grad_out", dy, x, s);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dx, da, db;
  if (output_mask[1]) da = at::zeros_like(lora_a);
  if (output_mask[2]) db = at::zeros_like(lora_b);
  if (output_mask[0]) {
    dx = at::empty({s.rows, s.d_in}, x.options());
    // lora_delta(dy, B^T, A^T): B^T is (S, R, d_out), A^T is (S, d_in, R).
    const LoraSizes swapped{s.rows, s.d_out, s.d_in, s.slots, s.max_rank};
    run_lora_cuda(dx, dy, lora_b.transpose(1, 2), lora_a.transpose(1, 2), slot_ids, scales, ranks, plan_arg,
                  swapped, /*accumulate=*/false);
  }
  if (s.rows == 0 || !(da.defined() || db.defined())) return {dx, da, db};
  const at::Tensor plan = plan_arg.has_value() ? *plan_arg : build_plan_cuda(slot_ids, s.slots);
  const at::Tensor scales_c = scales.has_value() ? scales->contiguous() : at::Tensor();
  const at::Tensor ranks_c = ranks.has_value() ? ranks->contiguous() : at::Tensor();
  const SlotParams slots{scales_c.defined() ? scales_c.data_ptr<float>() : nullptr,
                         ranks_c.defined() ? ranks_c.data_ptr() : nullptr,
                         ranks_c.defined() && ranks_c.scalar_type() == at::kLong, static_cast<int>(s.max_rank)};
  switch (x.scalar_type()) {
    case at::kFloat: weight_grads<float>(dy, x, lora_a, lora_b, plan, slots, s, da, db, stream); break;
    case at::kHalf: weight_grads<at::Half>(dy, x, lora_a, lora_b, plan, slots, s, da, db, stream); break;
    default: weight_grads<at::BFloat16>(dy, x, lora_a, lora_b, plan, slots, s, da, db, stream);
  }
  return {dx, da, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) { m.impl("lora_backward", &lora_backward_cuda); }

}  // namespace cuda
}  // namespace lora_ext
