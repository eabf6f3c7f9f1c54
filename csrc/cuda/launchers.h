// Host-side launchers of the CUDA kernel families, instantiated for float, __half and
// __nv_bfloat16 in simt.cu (decode: CUDA cores, any dtype) and mma.cu (prefill: tensor cores).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <cuda_runtime.h>

#include "cuda/common.cuh"
#include "lora_args.h"

namespace lora_ext {
namespace cuda {

// How lora_b is laid out in memory, which decides how expand streams it.
enum class BLayout {
  kGeneric,         // any strides: scalar loads
  kOutContiguous,   // stride along d_out is 1: 16-byte loads along d_out
  kRankContiguous,  // stride along R is 1 (PEFT's layout): 16-byte loads along the rank
};

constexpr int kSimtThreads = 128;

template <typename T>
void launch_shrink_simt(const ShrinkArgs<T>& args, int num_tiles, int splits, bool vector_loads,
                        cudaStream_t stream);
template <typename T>
void launch_expand_simt(const ExpandArgs<T>& args, int num_tiles, BLayout layout, cudaStream_t stream);

template <typename T>
void launch_shrink_mma(const ShrinkArgs<T>& args, int num_tiles, int splits, cudaStream_t stream);
template <typename T>
void launch_expand_mma(const ExpandArgs<T>& args, int num_tiles, cudaStream_t stream);

// out (+)= the LoRA deltas of x's rows (lora_delta / add_lora_ after the argument checks), on the
// current stream; lora_backward runs it with A and B swapped for dx.
void run_lora_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                   const at::Tensor& slot_ids, const c10::optional<at::Tensor>& scales,
                   const c10::optional<at::Tensor>& ranks, const c10::optional<at::Tensor>& plan_arg,
                   const LoraSizes& s, bool accumulate);

// Columns of d_out one expand block covers.
int simt_expand_cols_per_block(BLayout layout, int elem_size);
constexpr int kMmaExpandCols = 128;

}  // namespace cuda
}  // namespace lora_ext
