// Prefill kernels on tensor cores (float16 and bfloat16, sm_80+): long runs of rows share an
// adapter, so a block takes a tile of kPrefillTileRows rows of one slot and multiplies it with
// 16x16x16 MMA fragments, accumulating in float32.
//   shrink: u_tile (64 x rank) = x_tile (64 x d_in) @ A[:rank]^T, split over d_in (split-K)
//   expand: out_tile (64 x 128) (+)= (scale * u_tile) @ B[128 cols, :rank]^T
// Ranks are padded to the fragment size with zeros written into shared memory: rows of A and
// columns of B at or beyond the rank are never read from global memory.
#include <c10/cuda/CUDAException.h>
#include <mma.h>

#include "cuda/launchers.h"
#include "plan.h"

namespace lora_ext {
namespace cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kRows = static_cast<int>(kPrefillTileRows);  // rows per tile (4 warps x 16)
constexpr int kFrag = 16;
constexpr int kStepK = 32;       // d_in (shrink) or rank (expand) per shared-memory stage
constexpr int kPad = 8;          // elements of padding per shared row, against bank conflicts
constexpr int kShrinkRanks = 64; // ranks one shrink pass computes (4 fragments per warp)
constexpr int kShrinkThreads = 128;
constexpr int kExpandThreads = 256;  // 8 warps: 4 row blocks x 2 column halves of 64

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define LORA_EXT_NO_MMA 1  // bf16 fragments need sm_80; the host never picks this path there
#endif

template <typename T>
__global__ void __launch_bounds__(kShrinkThreads) shrink_mma_kernel(ShrinkArgs<T> args) {
#ifndef LORA_EXT_NO_MMA
  constexpr int E = Vec<T>::kElems;  // 8
  constexpr int kLd = kStepK + kPad;
  __shared__ __align__(32) T xs[kRows][kLd];
  __shared__ __align__(32) T as[kShrinkRanks][kLd];
  __shared__ __align__(32) float cs[kRows][kShrinkRanks + 4];

  const RowTile tile = row_tile(args.plan, args.plan.num_slots, blockIdx.x, kRows);
  if (tile.bin < 0) return;
  const int rank = args.slots.rank(tile.bin);
  if (rank <= 0) return;
  const int warp = threadIdx.x / kWarp;
  const int k_begin = blockIdx.y * args.k_chunk;
  const int k_end = min(args.d_in, k_begin + args.k_chunk);
  const T* a_slot = args.a + tile.bin * args.a_slot_stride;

  // Each thread stages two 16-byte vectors of x and two of A per step: (row, 8 columns).
  constexpr int kVecsPerRow = kStepK / E;  // 4
  constexpr int kLoads = kRows * kVecsPerRow / kShrinkThreads;  // 2
  int load_row[kLoads], load_col[kLoads];
  const T* x_row[kLoads];
#pragma unroll
  for (int l = 0; l < kLoads; ++l) {
    const int idx = threadIdx.x + l * kShrinkThreads;
    load_row[l] = idx / kVecsPerRow;
    load_col[l] = (idx % kVecsPerRow) * E;
    const int row = args.plan.order[tile.first + min(load_row[l], tile.count - 1)];
    x_row[l] = args.x + row * args.x_row_stride;
  }

  for (int rg = 0; rg < rank; rg += kShrinkRanks) {
    wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[kShrinkRanks / kFrag];
#pragma unroll
    for (int j = 0; j < kShrinkRanks / kFrag; ++j) wmma::fill_fragment(acc[j], 0.f);
    for (int k0 = k_begin; k0 < k_end; k0 += kStepK) {
#pragma unroll
      for (int l = 0; l < kLoads; ++l) {
        const int k = k0 + load_col[l];
        const bool in_k = k < k_end;
        const uint4 zero = make_uint4(0, 0, 0, 0);
        const uint4 xv = (in_k && load_row[l] < tile.count) ? load_16_bytes(x_row[l] + k) : zero;
        const int r = rg + load_row[l];
        const uint4 av = (in_k && r < rank) ? load_16_bytes(a_slot + r * args.a_rank_stride + k) : zero;
        *reinterpret_cast<uint4*>(&xs[load_row[l]][load_col[l]]) = xv;
        *reinterpret_cast<uint4*>(&as[load_row[l]][load_col[l]]) = av;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kStepK; kk += kFrag) {
        wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> x_frag;
        wmma::load_matrix_sync(x_frag, &xs[warp * kFrag][kk], kLd);
#pragma unroll
        for (int j = 0; j < kShrinkRanks / kFrag; ++j) {
          if (rg + j * kFrag >= rank) break;
          wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::col_major> a_frag;
          wmma::load_matrix_sync(a_frag, &as[j * kFrag][kk], kLd);
          wmma::mma_sync(acc[j], x_frag, a_frag, acc[j]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < kShrinkRanks / kFrag; ++j) {
      wmma::store_matrix_sync(&cs[warp * kFrag][j * kFrag], acc[j], kShrinkRanks + 4, wmma::mem_row_major);
    }
    __syncthreads();
    const int ranks_here = min(kShrinkRanks, rank - rg);
    for (int idx = threadIdx.x; idx < tile.count * kShrinkRanks; idx += kShrinkThreads) {
      const int i = idx / kShrinkRanks, c = idx % kShrinkRanks;
      if (c < ranks_here) {
        const int row = args.plan.order[tile.first + i];
        args.partial[(static_cast<int64_t>(blockIdx.y) * args.rows + row) * args.max_rank + rg + c] = cs[i][c];
      }
    }
    __syncthreads();
  }
#endif
}

template <typename T>
__global__ void __launch_bounds__(kExpandThreads) expand_mma_kernel(ExpandArgs<T> args) {
#ifndef LORA_EXT_NO_MMA
  constexpr int kLd = kStepK + kPad;
  constexpr int kCols = kMmaExpandCols;  // 128
  constexpr int kCsLd = kCols + 4;
  struct Operands {
    T us[kRows][kLd];
    T bs[kCols][kLd];
  };
  union SharedTiles {
    Operands ops;
    float cs[kRows][kCsLd];  // the result tile, after the last MMA
  };
  __shared__ __align__(32) SharedTiles smem;

  const int n_begin = blockIdx.y * kCols;
  const int n_end = min(args.d_out, n_begin + kCols);
  const RowTile tile = row_tile(args.plan, args.plan.num_slots + 2, blockIdx.x, kRows);
  int rank = 0;
  if (!expand_tile_has_work<T>(args, tile, n_begin, n_end, &rank)) return;

  const int warp = threadIdx.x / kWarp;
  const int row_block = warp % 4, col_half = warp / 4;
  const float scale = args.slots.scale(tile.bin);
  const T* b_slot = args.b + tile.bin * args.b_slot_stride;
  const bool rank_contiguous = args.b_rank_stride == 1;

  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[j], 0.f);

  for (int r0 = 0; r0 < rank; r0 += kStepK) {
    for (int idx = threadIdx.x; idx < kRows * kStepK; idx += kExpandThreads) {
      const int i = idx / kStepK, r = idx % kStepK;
      float v = 0.f;
      if (i < tile.count && r0 + r < rank) v = scale * args.u(args.plan.order[tile.first + i], r0 + r);
      smem.ops.us[i][r] = from_float<T>(v);
    }
    for (int idx = threadIdx.x; idx < kCols * kStepK; idx += kExpandThreads) {
      // Walk B along whichever dimension is contiguous in memory, so loads coalesce.
      const int c = rank_contiguous ? idx / kStepK : idx % kCols;
      const int r = rank_contiguous ? idx % kStepK : idx / kCols;
      const int n = n_begin + c;
      T v = from_float<T>(0.f);
      if (n < n_end && r0 + r < rank) v = b_slot[n * args.b_out_stride + (r0 + r) * args.b_rank_stride];
      smem.ops.bs[c][r] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kStepK; kk += kFrag) {
      if (r0 + kk >= rank) break;
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> u_frag;
      wmma::load_matrix_sync(u_frag, &smem.ops.us[row_block * kFrag][kk], kLd);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::col_major> b_frag;
        wmma::load_matrix_sync(b_frag, &smem.ops.bs[col_half * 64 + j * kFrag][kk], kLd);
        wmma::mma_sync(acc[j], u_frag, b_frag, acc[j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    wmma::store_matrix_sync(&smem.cs[row_block * kFrag][col_half * 64 + j * kFrag], acc[j], kCsLd,
                            wmma::mem_row_major);
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < tile.count * kCols; idx += kExpandThreads) {
    const int i = idx / kCols, c = idx % kCols;
    const int n = n_begin + c;
    if (n >= n_end) continue;
    const int row = args.plan.order[tile.first + i];
    T* o = args.out + row * args.out_row_stride + n * args.out_col_stride;
    const float v = smem.cs[i][c];
    *o = from_float<T>(args.accumulate ? to_float(*o) + v : v);
  }
#endif
}

}  // namespace

template <typename T>
void launch_shrink_mma(const ShrinkArgs<T>& args, int num_tiles, int splits, cudaStream_t stream) {
  shrink_mma_kernel<T><<<dim3(num_tiles, splits), kShrinkThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_expand_mma(const ExpandArgs<T>& args, int num_tiles, cudaStream_t stream) {
  const dim3 grid(num_tiles, (args.d_out + kMmaExpandCols - 1) / kMmaExpandCols);
  expand_mma_kernel<T><<<grid, kExpandThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_shrink_mma<__half>(const ShrinkArgs<__half>&, int, int, cudaStream_t);
template void launch_shrink_mma<__nv_bfloat16>(const ShrinkArgs<__nv_bfloat16>&, int, int, cudaStream_t);
template void launch_expand_mma<__half>(const ExpandArgs<__half>&, int, cudaStream_t);
template void launch_expand_mma<__nv_bfloat16>(const ExpandArgs<__nv_bfloat16>&, int, cudaStream_t);

}  // namespace cuda
}  // namespace lora_ext
