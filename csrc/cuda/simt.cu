// Decode kernels on CUDA cores (any dtype): few rows per adapter, memory-bound. Each block
// handles one tile of up to kDecodeTileRows rows sharing a slot, so an adapter's weights are
// read once per tile; shrink splits d_in across blocks (split-K) to fill the GPU, and expand
// sums the splits while it streams B.
#include <c10/cuda/CUDAException.h>

#include "cuda/launchers.h"
#include "plan.h"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kRowsPerTile = static_cast<int>(kDecodeTileRows);
constexpr int kShrinkRanksPerPass = 8;   // ranks one shrink pass accumulates in registers
constexpr int kRankChunk = 64;  // ranks of u one expand pass keeps in shared memory
constexpr int kColsPerThread = 4;  // expand columns per thread when B is not d_out-contiguous

// Loads E consecutive elements of a row (16-byte vector when kVec, else strided scalars).
template <typename T, bool kVec>
__device__ __forceinline__ void load_row_elems(const T* p, int64_t stride,
                                               float (&v)[kVec ? Vec<T>::kElems : 1]) {
  if constexpr (kVec) {
    unpack_16_bytes<T>(load_16_bytes(p), v);
  } else {
    v[0] = to_float(p[0 * stride]);
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kSimtThreads) shrink_simt_kernel(ShrinkArgs<T> args) {
  constexpr int E = kVec ? Vec<T>::kElems : 1;
  const RowTile tile = row_tile(args.plan, args.plan.num_slots, blockIdx.x, kRowsPerTile);
  if (tile.bin < 0) return;
  const int rank = args.slots.rank(tile.bin);
  if (rank <= 0) return;  // expand writes these rows (zeros, or NaN for an invalid rank)

  int rows[kRowsPerTile];
#pragma unroll
  for (int i = 0; i < kRowsPerTile; ++i) rows[i] = args.plan.order[tile.first + min(i, tile.count - 1)];
  const int k_begin = blockIdx.y * args.k_chunk;
  const int k_end = min(args.d_in, k_begin + args.k_chunk);
  const T* a_slot = args.a + tile.bin * args.a_slot_stride;
  __shared__ float partial_sums[kSimtThreads / kWarp][kShrinkRanksPerPass][kRowsPerTile];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;

  for (int r0 = 0; r0 < rank; r0 += kShrinkRanksPerPass) {
    float acc[kShrinkRanksPerPass][kRowsPerTile] = {};
    for (int k = k_begin + threadIdx.x * E; k < k_end; k += kSimtThreads * E) {
      float xv[kRowsPerTile][E];
#pragma unroll
      for (int i = 0; i < kRowsPerTile; ++i) {
        load_row_elems<T, kVec>(args.x + rows[i] * args.x_row_stride + k * args.x_col_stride,
                                args.x_col_stride, xv[i]);
      }
#pragma unroll
      for (int j = 0; j < kShrinkRanksPerPass; ++j) {
        if (r0 + j >= rank) break;
        float av[E];
        load_row_elems<T, kVec>(a_slot + (r0 + j) * args.a_rank_stride + k * args.a_col_stride,
                                args.a_col_stride, av);
#pragma unroll
        for (int i = 0; i < kRowsPerTile; ++i) {
#pragma unroll
          for (int e = 0; e < E; ++e) acc[j][i] = fmaf(av[e], xv[i][e], acc[j][i]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kShrinkRanksPerPass; ++j) {
#pragma unroll
      for (int i = 0; i < kRowsPerTile; ++i) {
        const float v = warp_sum(acc[j][i]);
        if (lane == 0) partial_sums[warp][j][i] = v;
      }
    }
    __syncthreads();
    if (threadIdx.x < kShrinkRanksPerPass * kRowsPerTile) {
      const int j = threadIdx.x / kRowsPerTile, i = threadIdx.x % kRowsPerTile;
      if (i < tile.count && r0 + j < rank) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < kSimtThreads / kWarp; ++w) sum += partial_sums[w][j][i];
        const int row = args.plan.order[tile.first + i];
        args.partial[(static_cast<int64_t>(blockIdx.y) * args.rows + row) * args.max_rank + r0 + j] = sum;
      }
    }
    __syncthreads();
  }
}

// Column c (0 <= c < cols_per_thread) of this thread's columns.
template <BLayout kLayout, typename T>
__device__ __forceinline__ int thread_col(int n_begin, int c) {
  if constexpr (kLayout == BLayout::kOutContiguous) return n_begin + threadIdx.x * Vec<T>::kElems + c;
  return n_begin + threadIdx.x + c * kSimtThreads;
}

// acc[i][c] += sum over r < rc of u[i][r] * B[slot, col c, r0 + r].
template <typename T, BLayout kLayout, int C>
__device__ __forceinline__ void expand_chunk(const ExpandArgs<T>& args, const T* b_slot, int r0,
                                             int rc, int n_begin, int n_end,
                                             const float (&u)[kRowsPerTile][kRankChunk],
                                             float (&acc)[kRowsPerTile][C]) {
  constexpr int E = Vec<T>::kElems;
  if constexpr (kLayout == BLayout::kOutContiguous) {
    const int n = thread_col<kLayout, T>(n_begin, 0);
    if (n >= n_end) return;
#pragma unroll 4
    for (int r = 0; r < rc; ++r) {
      float bv[E];
      unpack_16_bytes<T>(load_16_bytes(b_slot + (r0 + r) * args.b_rank_stride + n), bv);
#pragma unroll
      for (int i = 0; i < kRowsPerTile; ++i) {
#pragma unroll
        for (int e = 0; e < E; ++e) acc[i][e] = fmaf(u[i][r], bv[e], acc[i][e]);
      }
    }
  } else {
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int n = thread_col<kLayout, T>(n_begin, c);
      if (n >= n_end) break;
      const T* b_row = b_slot + n * args.b_out_stride + r0 * args.b_rank_stride;
      int r = 0;
      if constexpr (kLayout == BLayout::kRankContiguous) {
        for (; r + E <= rc; r += E) {
          float bv[E];
          unpack_16_bytes<T>(load_16_bytes(b_row + r), bv);
#pragma unroll
          for (int i = 0; i < kRowsPerTile; ++i) {
#pragma unroll
            for (int e = 0; e < E; ++e) acc[i][c] = fmaf(u[i][r + e], bv[e], acc[i][c]);
          }
        }
      }
      for (; r < rc; ++r) {
        const float bv = to_float(b_row[r * args.b_rank_stride]);
#pragma unroll
        for (int i = 0; i < kRowsPerTile; ++i) acc[i][c] = fmaf(u[i][r], bv, acc[i][c]);
      }
    }
  }
}

template <typename T, BLayout kLayout>
__device__ __forceinline__ void store_cols(const ExpandArgs<T>& args, int row, int n_begin,
                                           int n_end, const float* acc) {
  constexpr int C = kLayout == BLayout::kOutContiguous ? Vec<T>::kElems : kColsPerThread;
  T* out_row = args.out + row * args.out_row_stride;
  if constexpr (kLayout == BLayout::kOutContiguous) {
    const int n = thread_col<kLayout, T>(n_begin, 0);
    if (args.out_vector_ok && n + C <= n_end) {
      float v[C];
      if (args.accumulate) unpack_16_bytes<T>(*reinterpret_cast<const uint4*>(out_row + n), v);
#pragma unroll
      for (int e = 0; e < C; ++e) v[e] = args.accumulate ? v[e] + acc[e] : acc[e];
      *reinterpret_cast<uint4*>(out_row + n) = pack_16_bytes<T>(v);
      return;
    }
  }
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int n = thread_col<kLayout, T>(n_begin, c);
    if (n >= n_end) break;
    T* o = out_row + n * args.out_col_stride;
    *o = from_float<T>(args.accumulate ? to_float(*o) + acc[c] : acc[c]);
  }
}

template <typename T, BLayout kLayout>
__global__ void __launch_bounds__(kSimtThreads) expand_simt_kernel(ExpandArgs<T> args) {
  constexpr int C = kLayout == BLayout::kOutContiguous ? Vec<T>::kElems : kColsPerThread;
  const int n_begin = blockIdx.y * kSimtThreads * C;
  const int n_end = min(args.d_out, n_begin + kSimtThreads * C);
  const RowTile tile = row_tile(args.plan, args.plan.num_slots + 2, blockIdx.x, kRowsPerTile);
  int rank = 0;
  if (!expand_tile_has_work<T>(args, tile, n_begin, n_end, &rank)) return;

  __shared__ float u[kRowsPerTile][kRankChunk];
  int rows[kRowsPerTile];
#pragma unroll
  for (int i = 0; i < kRowsPerTile; ++i) rows[i] = args.plan.order[tile.first + min(i, tile.count - 1)];
  const float scale = args.slots.scale(tile.bin);
  const T* b_slot = args.b + tile.bin * args.b_slot_stride;
  float acc[kRowsPerTile][C] = {};
  for (int r0 = 0; r0 < rank; r0 += kRankChunk) {
    const int rc = min(kRankChunk, rank - r0);
    __syncthreads();
    for (int idx = threadIdx.x; idx < kRowsPerTile * kRankChunk; idx += kSimtThreads) {
      const int i = idx / kRankChunk, r = idx % kRankChunk;
      u[i][r] = (i < tile.count && r < rc) ? scale * args.u(args.plan.order[tile.first + i], r0 + r) : 0.f;
    }
    __syncthreads();
    expand_chunk<T, kLayout, C>(args, b_slot, r0, rc, n_begin, n_end, u, acc);
  }
#pragma unroll
  for (int i = 0; i < kRowsPerTile; ++i) {
    if (i < tile.count) store_cols<T, kLayout>(args, rows[i], n_begin, n_end, acc[i]);
  }
}

}  // namespace

int simt_expand_cols_per_block(BLayout layout, int elem_size) {
  return kSimtThreads * (layout == BLayout::kOutContiguous ? 16 / elem_size : kColsPerThread);
}

template <typename T>
void launch_shrink_simt(const ShrinkArgs<T>& args, int num_tiles, int splits, bool vector_loads,
                        cudaStream_t stream) {
  const dim3 grid(num_tiles, splits);
  if (vector_loads) {
    shrink_simt_kernel<T, true><<<grid, kSimtThreads, 0, stream>>>(args);
  } else {
    shrink_simt_kernel<T, false><<<grid, kSimtThreads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_expand_simt(const ExpandArgs<T>& args, int num_tiles, BLayout layout, cudaStream_t stream) {
  const int cols = simt_expand_cols_per_block(layout, sizeof(T));
  const dim3 grid(num_tiles, (args.d_out + cols - 1) / cols);
  switch (layout) {
    case BLayout::kOutContiguous:
      expand_simt_kernel<T, BLayout::kOutContiguous><<<grid, kSimtThreads, 0, stream>>>(args);
      break;
    case BLayout::kRankContiguous:
      expand_simt_kernel<T, BLayout::kRankContiguous><<<grid, kSimtThreads, 0, stream>>>(args);
      break;
    default:
      expand_simt_kernel<T, BLayout::kGeneric><<<grid, kSimtThreads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define LORA_EXT_INSTANTIATE_SIMT(T)                                                            \
  template void launch_shrink_simt<T>(const ShrinkArgs<T>&, int, int, bool, cudaStream_t);      \
  template void launch_expand_simt<T>(const ExpandArgs<T>&, int, BLayout, cudaStream_t);

LORA_EXT_INSTANTIATE_SIMT(float)
LORA_EXT_INSTANTIATE_SIMT(__half)
LORA_EXT_INSTANTIATE_SIMT(__nv_bfloat16)

}  // namespace cuda
}  // namespace lora_ext
