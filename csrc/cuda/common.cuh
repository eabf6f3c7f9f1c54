// Device helpers shared by the CUDA kernels: element types, 16-byte vector loads, the batch
// plan lookup, per-slot rank and scale, and the argument structs passed to the kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace lora_ext {
namespace cuda {

constexpr int kWarp = 32;

// The CUDA element type of a torch scalar type.
template <typename T>
struct DeviceType { using type = T; };
template <>
struct DeviceType<c10::Half> { using type = __half; };
template <>
struct DeviceType<c10::BFloat16> { using type = __nv_bfloat16; };

// ---- element conversion ----------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements per 16-byte vector.
template <typename T>
struct Vec {
  static constexpr int kElems = 16 / sizeof(T);
};

// A raw 16-byte load through the read-only path; unpack with unpack_16_bytes.
__device__ __forceinline__ uint4 load_16_bytes(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

template <typename T>
__device__ __forceinline__ void unpack_16_bytes(const uint4& raw, float (&f)[Vec<T>::kElems]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::kElems; ++i) f[i] = to_float(e[i]);
}

template <typename T>
__device__ __forceinline__ uint4 pack_16_bytes(const float (&f)[Vec<T>::kElems]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::kElems; ++i) e[i] = from_float<T>(f[i]);
  return raw;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ---- the batch plan (layout in csrc/plan.h) ---------------------------------------------------
struct PlanView {
  const int32_t* offsets;
  const int32_t* tiles;  // decode_tiles or prefill_tiles, whichever the kernel's tile size uses
  const int32_t* order;
  int num_slots;

  __host__ __device__ int no_adapter_bin() const { return num_slots; }
  __host__ __device__ int invalid_bin() const { return num_slots + 1; }
};

// The bin that holds row tile `tile` among the first `num_bins` bins, or -1 past their last tile.
__device__ __forceinline__ int find_bin(const int32_t* tiles, int num_bins, int tile) {
  if (tile >= tiles[num_bins]) return -1;
  int lo = 0, hi = num_bins;  // tiles[lo] <= tile < tiles[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (tiles[mid] <= tile) lo = mid; else hi = mid;
  }
  return lo;
}

// The rows of one tile: order[first : first + count].
struct RowTile {
  int bin;
  int first;
  int count;
};

__device__ __forceinline__ RowTile row_tile(const PlanView& plan, int num_bins, int tile,
                                            int tile_rows) {
  RowTile t{find_bin(plan.tiles, num_bins, tile), 0, 0};
  if (t.bin < 0) return t;
  t.first = plan.offsets[t.bin] + (tile - plan.tiles[t.bin]) * tile_rows;
  t.count = min(tile_rows, plan.offsets[t.bin + 1] - t.first);
  return t;
}

// ---- per-slot parameters ------------------------------------------------------------------------
struct SlotParams {
  const float* scales;  // (S,) or nullptr for 1.0
  const void* ranks;    // (S,) int32 or int64, or nullptr for max_rank
  bool ranks_are_int64;
  int max_rank;

  __device__ __forceinline__ int rank(int slot) const {
    if (ranks == nullptr) return max_rank;
    const int64_t r = ranks_are_int64 ? static_cast<const int64_t*>(ranks)[slot]
                                      : static_cast<const int32_t*>(ranks)[slot];
    return (r < 0 || r > max_rank) ? -1 : static_cast<int>(r);  // -1: invalid, rows get NaN
  }
  __device__ __forceinline__ float scale(int slot) const {
    return scales == nullptr ? 1.0f : scales[slot];
  }
};

// ---- kernel arguments ---------------------------------------------------------------------------
// Shrink: partial[split, t, r] = sum over this split's k of A[slot, r, k] * x[t, k], for r < rank.
template <typename T>
struct ShrinkArgs {
  const T* x;
  int64_t x_row_stride, x_col_stride;
  const T* a;
  int64_t a_slot_stride, a_rank_stride, a_col_stride;
  int d_in;
  int k_chunk;  // columns of d_in per split (blockIdx.y)
  float* partial;  // (splits, T, R) float32
  int rows, max_rank;
  PlanView plan;
  SlotParams slots;
};

// Expand: out[t, n] (+)= scale * sum_r B[slot, n, r] * (sum over splits of partial[split, t, r]).
template <typename T>
struct ExpandArgs {
  const float* partial;
  int splits, rows, max_rank;
  const T* b;
  int64_t b_slot_stride, b_out_stride, b_rank_stride;
  T* out;
  int64_t out_row_stride, out_col_stride;
  bool out_vector_ok;  // 16-byte stores along columns are aligned and in bounds
  int d_out;
  bool accumulate;  // add_lora_ (true) or lora_delta (false, rows without adapter get zeros)
  PlanView plan;
  SlotParams slots;

  __device__ __forceinline__ float u(int row, int r) const {  // the shrink result, splits summed
    float s = 0.f;
    for (int k = 0; k < splits; ++k) s += partial[(static_cast<int64_t>(k) * rows + row) * max_rank + r];
    return s;
  }
};

// Rows that get no LoRA delta: zeros in lora_delta, nothing in add_lora_; NaN where the slot id
// or rank was invalid (so a bad id is never silent on the GPU, where ids are not checked).
template <typename T, typename Args>
__device__ void fill_rows(const Args& args, const RowTile& tile, int col_begin, int col_end,
                          bool poison) {
  if (args.accumulate && !poison) return;
  const float value = poison ? __int_as_float(0x7fc00000) : 0.f;
  const int cols = col_end - col_begin;
  for (int idx = threadIdx.x; idx < tile.count * cols; idx += blockDim.x) {
    const int row = args.plan.order[tile.first + idx / cols];
    T* o = args.out + row * args.out_row_stride + (col_begin + idx % cols) * args.out_col_stride;
    *o = from_float<T>(args.accumulate ? to_float(*o) + value : value);
  }
}

// Which rows a tile of expand covers and whether it has LoRA work; fills rows that do not.
template <typename T>
__device__ __forceinline__ bool expand_tile_has_work(const ExpandArgs<T>& args, const RowTile& tile,
                                                     int col_begin, int col_end, int* rank) {
  if (tile.bin < 0) return false;
  if (tile.bin == args.plan.no_adapter_bin()) {
    fill_rows<T>(args, tile, col_begin, col_end, false);
    return false;
  }
  *rank = tile.bin == args.plan.invalid_bin() ? -1 : args.slots.rank(tile.bin);
  if (*rank <= 0) {
    fill_rows<T>(args, tile, col_begin, col_end, *rank < 0);
    return false;
  }
  return true;
}

}  // namespace cuda
}  // namespace lora_ext
