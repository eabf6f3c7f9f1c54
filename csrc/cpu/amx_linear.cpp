// The AMX path of linear_lora (amx_linear.h): three steps in one parallel region, a barrier
// between them.
//  1. Pack: x's rows, in the plan's order, 16 to a block, into the tile unit's pair layout
//     (pairs[block][k / 2][row][k % 2]), zero-padded to whole tiles.
//  2. Shrink: h[row, r] = scale * <A[r], x[row]> for each slot's rows: tile products of 16 ranks of
//     A (read straight from memory) with the packed blocks that hold the slot's rows. One task per
//     (slot, 16 ranks).
//  3. Base and deltas, by blocks of 16 output columns split over threads: the base GEMM computed
//     transposed, (W x^T) tiles of 16 columns x 16 rows with W's rows read straight from memory
//     as the left operand (the weight is never repacked), each pass over the row blocks asking for
//     its share of the next column blocks' weight rows (rows_prefetch.h); each finished tile is
//     transposed in registers and kept, with the bias, as float32 for the thread's columns. Then,
//     one slot at a time along those columns (B's rank-major rows stream in order, their lines
//     asked for ahead), each row's delta sum_r h[row, r] B[n, r] is added with float32 FMAs (B
//     loaded straight into registers for slots of 1-2 rows, through a float32 copy of each chunk
//     for more) and the row is rounded to the output dtype once.
// float16 runs every tile product as three on bfloat16 parts (split_halves below).
// Tiles, all 16 rows x 64 bytes: float32 sums in 0-3 (bfloat16 base GEMM: 2 column x 2 row blocks)
// or 0-1 (the shrink, float16: 2 row blocks), left operands (W or A; float16: high and low parts)
// next, packed x last.
#include "cpu/amx_linear.h"

#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>

#include "cpu/amx_tiles.h"
#include "cpu/item_kernels.h"
#include "cpu/rows_prefetch.h"
#include "cpu/work.h"
#include "kernel_config.h"

#ifdef LORA_EXT_HAVE_AMX
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace lora_ext {
namespace cpu {

bool amx_bf16_usable() {
#ifdef LORA_EXT_HAVE_AMX
  static const bool usable = [] {
    constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an extended state component
    constexpr long kXfeatureXtiledata = 18;      // ... the tile data registers
    return cpu_has_amx_bf16() && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

bool amx_path_on() { return setting(Setting::kCpuAmx) != 0 && amx_bf16_usable(); }

}  // namespace cpu
}  // namespace lora_ext

#ifdef LORA_EXT_HAVE_AMX
#include "cpu/avx512_begin.h"
#pragma GCC target("avx512bf16,amx-tile,amx-bf16")

#include "cpu/avx512_lanes.h"

namespace lora_ext {
namespace cpu {
namespace {

using namespace amx;

// What every step reads: the shapes, the packed rows and h.
struct Shared {
  const BaseGemmArgs& g;
  const AmxLoraArgs& lora;
  int64_t steps;        // tile products along k: ceil(k / 32)
  int64_t blocks;       // blocks of 16 rows: ceil(m / 16)
  bf16* pairs;          // blocks x steps x (16 pairs of k x 16 rows x 2); float16: the high parts
  bf16* pairs_lo;       // float16: the low parts, laid out the same; else unused
  float* h;             // (m, h_stride): row m' of the plan's order, scale included
  int64_t h_stride;

  int64_t offset(int64_t block, int64_t step) const { return (block * steps + step) * kTile * kStepK; }
  const bf16* packed(int64_t block, int64_t step) const { return pairs + offset(block, step); }
  const bf16* packed_lo(int64_t block, int64_t step) const { return pairs_lo + offset(block, step); }
  int64_t rows_in(int64_t block) const { return std::min<int64_t>(kTile, g.m - block * kTile); }
};

// Step 1 for (block, step): 16 rows x 32 values of k, transposed as 32-bit pairs.
template <typename T>
void pack_block(const Shared& s, int64_t block, int64_t step) {
  const BaseGemmArgs& g = s.g;
  const int64_t k0 = step * kStepK;
  const __mmask32 mask = first_of_32(g.k - k0);
  __m512i r[16], lo[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    const int64_t m = block * kTile + i;
    r[i] = m < g.m ? _mm512_maskz_loadu_epi16(mask, static_cast<const T*>(g.x) + s.lora.order[m] * g.x_row_stride + k0)
                   : _mm512_setzero_si512();
    if constexpr (kSplit<T>) split_halves(r[i], r[i], lo[i]);
  }
  transpose_16x16(r);
  bf16* dst = s.pairs + s.offset(block, step);
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * kStepK, r[i]);
  if constexpr (kSplit<T>) {
    transpose_16x16(lo);
    bf16* dst_lo = s.pairs_lo + s.offset(block, step);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst_lo + i * kStepK, lo[i]);
  }
}

// sums[i] = left (16 rows) x the packed rows of block + i, for i < 2 (i = 1 only when `two`):
// float32 sums over every step of k, as stored from tiles 0 and 1. bfloat16: one tile product per
// step; float16: hi.hi + hi.lo + lo.hi.
template <typename T>
void left_times_blocks(const Shared& s, const RowTiles<T>& left, int64_t block, bool two,
                       float (&sums)[2][kTile][kTile], RowsPrefetch next = {}) {
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t step = 0; step < s.steps; ++step) {
    next.step();
    _tile_loadd(2, left.at(step), left.stride_bytes(step));
    _tile_loadd(4, s.packed(block, step), kTileBytes);
    _tile_dpbf16ps(0, 2, 4);
    if (two) {
      _tile_loadd(6, s.packed(block + 1, step), kTileBytes);
      _tile_dpbf16ps(1, 2, 6);
    }
    if constexpr (kSplit<T>) {
      _tile_loadd(3, left.at_lo(step), kTileBytes);
      _tile_loadd(5, s.packed_lo(block, step), kTileBytes);
      _tile_dpbf16ps(0, 2, 5);
      _tile_dpbf16ps(0, 3, 4);
      if (two) {
        _tile_loadd(7, s.packed_lo(block + 1, step), kTileBytes);
        _tile_dpbf16ps(1, 2, 7);
        _tile_dpbf16ps(1, 3, 6);
      }
    }
  }
  _tile_stored(0, sums[0], kTileBytes);
  _tile_stored(1, sums[1], kTileBytes);
  compiler_barrier();
}

// What the pass over the pair of row blocks from `block` asks for of the next weight rows
// [n_begin, n_end) (rows_prefetch.h): one of the passes over them.
RowsPrefetch next_weights(const Shared& s, int64_t n_begin, int64_t n_end, int64_t block) {
  return next_weight_rows(s.g, n_begin, n_end, block / 2, (s.blocks + 1) / 2, s.steps);
}

// Step 2 for 16 ranks from r0 of one segment.
template <typename T>
void shrink_task(const Shared& s, const AmxSegment& seg, int64_t r0, bf16* scratch) {
  const AmxLoraArgs& lora = s.lora;
  const RowTiles<T> a(static_cast<const T*>(seg.a) + r0 * lora.a_rank_stride, lora.a_rank_stride,
                      std::min(kTile, seg.rank - r0), lora.max_rank - r0, s.g.k, s.steps, scratch);
  const int64_t last_block = (seg.first + seg.count - 1) / kTile;
  for (int64_t block = seg.first / kTile; block <= last_block; block += 2) {
    const bool two = block + 1 <= last_block;
    alignas(64) float sums[2][kTile][kTile];
    left_times_blocks(s, a, block, two, sums);
    const __mmask16 ranks = first_lanes(seg.rank - r0);
    const __m512 scale = _mm512_set1_ps(seg.scale);
    for (int half = 0; half < (two ? 2 : 1); ++half) {
      __m512i r[16];
      load_transposed(sums[half], r);  // r[i]: the 16 ranks of the block's row i
      const int64_t base = (block + half) * kTile;
      const int64_t begin = std::max<int64_t>(seg.first, base) - base;
      const int64_t end = std::min<int64_t>(seg.first + seg.count, base + kTile) - base;
      for (int64_t i = begin; i < end; ++i) {
        _mm512_mask_storeu_ps(s.h + (base + i) * s.h_stride + r0, ranks, _mm512_mul_ps(scale, _mm512_castsi512_ps(r[i])));
      }
    }
  }
}

// B[r, n0 .. n0 + 16) of one segment as float32, for r < rank (zero past d_out).
template <typename T>
void widen_b(const Shared& s, const AmxSegment& seg, int64_t n0, float* bw) {
  const AmxLoraArgs& lora = s.lora;
  const T* b = static_cast<const T*>(seg.b);
  const int64_t cols = std::min<int64_t>(kTile, s.g.n - n0);
  if (lora.b_out_stride == 1) {
    for (int64_t r = 0; r < seg.rank; ++r) {
      _mm512_store_ps(bw + r * kTile, avx512::load_16_lanes(b + r * lora.b_rank_stride + n0, first_lanes(cols)));
    }
    return;
  }
  for (int64_t r = 0; r < seg.rank; ++r) {
    for (int64_t j = 0; j < kTile; ++j) {
      bw[r * kTile + j] = j < cols ? static_cast<float>(b[(n0 + j) * lora.b_out_stride + r * lora.b_rank_stride]) : 0.f;
    }
  }
}

// One thread's output columns [n_begin, n_end) as float32 sums with the bias, before the deltas:
// sums[m', n - n_begin] for row m' of the plan's order.
struct ColumnSums {
  float* sums;
  int64_t stride;
  int64_t n_begin, n_end;

  float* at(int64_t m, int64_t n) const { return sums + m * stride + (n - n_begin); }
};

// A finished tile (16 columns from n0 x the 16 rows of `block`): transposed, plus the bias, into `c`.
template <typename T>
void store_tile(const Shared& s, const float (&tile)[kTile][kTile], int64_t n0, int64_t block, const ColumnSums& c) {
  const BaseGemmArgs& g = s.g;
  const __m512 bias = g.bias != nullptr ? avx512::load_16_lanes(static_cast<const T*>(g.bias) + n0, first_lanes(g.n - n0))
                                        : _mm512_setzero_ps();
  __m512i r[16];
  load_transposed(tile, r);
  const int64_t base = block * kTile, count = s.rows_in(block);
  for (int64_t i = 0; i < count; ++i) {
    _mm512_store_ps(c.at(base + i, n0), _mm512_add_ps(_mm512_castsi512_ps(r[i]), bias));
  }
}

// Step 3's base GEMM for bfloat16: column blocks [begin, end), two at a time, into `c`.
void base_columns_bf16(const Shared& s, int64_t begin, int64_t end, bf16* scratch, const ColumnSums& c) {
  const BaseGemmArgs& g = s.g;
  const bf16* w = static_cast<const bf16*>(g.w);
  const int64_t operand = RowTiles<bf16>::scratch_size(s.steps);
  for (int64_t col = begin; col < end; col += 2) {
    const bool two_cols = col + 1 < end;
    const int64_t n0 = col * kTile, n1 = n0 + kTile;
    const RowTiles<bf16> w0(w + n0 * g.w_row_stride, g.w_row_stride, g.n - n0, g.n - n0, g.k, s.steps, scratch);
    const int64_t c1 = two_cols ? n1 : n0;  // without a second block, an unused copy of the first
    const RowTiles<bf16> w1(w + c1 * g.w_row_stride, g.w_row_stride, g.n - c1, g.n - c1, g.k, s.steps, scratch + operand);
    for (int64_t block = 0; block < s.blocks; block += 2) {
      const bool two_rows = block + 1 < s.blocks;
      RowsPrefetch next = next_weights(s, n0 + 2 * kTile, std::min(n0 + 4 * kTile, c.n_end), block);
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t step = 0; step < s.steps; ++step) {
        next.step();
        _tile_loadd(4, w0.at(step), w0.stride_bytes(step));
        _tile_loadd(6, s.packed(block, step), kTileBytes);
        _tile_dpbf16ps(0, 4, 6);
        if (two_rows) {
          _tile_loadd(7, s.packed(block + 1, step), kTileBytes);
          _tile_dpbf16ps(1, 4, 7);
        }
        if (two_cols) {
          _tile_loadd(5, w1.at(step), w1.stride_bytes(step));
          _tile_dpbf16ps(2, 5, 6);
          if (two_rows) _tile_dpbf16ps(3, 5, 7);
        }
      }
      alignas(64) float sums[4][kTile][kTile];
      _tile_stored(0, sums[0], kTileBytes);
      _tile_stored(1, sums[1], kTileBytes);
      _tile_stored(2, sums[2], kTileBytes);
      _tile_stored(3, sums[3], kTileBytes);
      compiler_barrier();
      store_tile<bf16>(s, sums[0], n0, block, c);
      if (two_rows) store_tile<bf16>(s, sums[1], n0, block + 1, c);
      if (two_cols) {
        store_tile<bf16>(s, sums[2], n1, block, c);
        if (two_rows) store_tile<bf16>(s, sums[3], n1, block + 1, c);
      }
    }
  }
}

// Step 3's base GEMM for float16: one column block at a time (its weight rows split once), three
// tile products per step (hi.hi, hi.lo, lo.hi) for each of two row blocks.
void base_columns_f16(const Shared& s, int64_t begin, int64_t end, bf16* scratch, const ColumnSums& c) {
  using T = c10::Half;
  const BaseGemmArgs& g = s.g;
  const T* w = static_cast<const T*>(g.w);
  for (int64_t col = begin; col < end; ++col) {
    const int64_t n0 = col * kTile;
    const RowTiles<T> w0(w + n0 * g.w_row_stride, g.w_row_stride, g.n - n0, g.n - n0, g.k, s.steps, scratch);
    for (int64_t block = 0; block < s.blocks; block += 2) {
      const bool two_rows = block + 1 < s.blocks;
      alignas(64) float sums[2][kTile][kTile];
      left_times_blocks(s, w0, block, two_rows, sums, next_weights(s, n0 + kTile, std::min(n0 + 2 * kTile, c.n_end), block));
      store_tile<T>(s, sums[0], n0, block, c);
      if (two_rows) store_tile<T>(s, sums[1], n0, block + 1, c);
    }
  }
}

// out[row of m', columns of c] = the sums rounded, for m' in [begin, end) (rows with no delta).
template <typename T>
void store_rows(const Shared& s, int64_t begin, int64_t end, const ColumnSums& c) {
  for (int64_t m = begin; m < end; ++m) {
    T* out = static_cast<T*>(s.g.out) + s.lora.order[m] * s.g.out_row_stride;
    for (int64_t n0 = c.n_begin; n0 < c.n_end; n0 += kTile) {
      avx512::store_16_lanes(out + n0, _mm512_load_ps(c.at(m, n0)), first_lanes(c.n_end - n0));
    }
  }
}

// How far ahead, in chunks of 16 columns, step 3 asks for B's lines. A thread's part of a rank's row
// of B is a short stream (12 to 32 lines in the bench model), too short for the hardware prefetcher
// to ramp up on before it ends; asked for ahead along the thread's sequence of (segment, chunk),
// crossing into the next segment's rows, the deltas step measured a quarter to a third faster at
// 32-64 adapters (16 ahead: less; benchmarks/NOTES.md).
constexpr int64_t kDeltaPrefetchChunks = 8;

// Asks for the lines of B's rank-major rows that chunk `chunk` + kDeltaPrefetchChunks of segment
// `segment` will read (the next segment's once past this one's columns), when that chunk starts a
// new line of rank 0's row (about once per line: the rows' alignments may differ).
template <typename T>
void prefetch_b_ahead(const Shared& s, const ColumnSums& c, size_t segment, int64_t chunk) {
  const int64_t chunks = (c.n_end - c.n_begin + kTile - 1) / kTile;
  int64_t ahead = chunk + kDeltaPrefetchChunks;
  if (ahead >= chunks) {
    ahead -= chunks;
    ++segment;
  }
  if (s.lora.b_out_stride != 1 || segment >= s.lora.segments.size() || ahead >= chunks) return;
  const AmxSegment& seg = s.lora.segments[segment];
  const T* b = static_cast<const T*>(seg.b) + c.n_begin + ahead * kTile;
  const bool new_line = ahead == 0 || (reinterpret_cast<uintptr_t>(b) & 63) < kTile * sizeof(T);
  if (!new_line) return;
  for (int64_t r = 0; r < seg.rank; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(b + r * s.lora.b_rank_stride), _MM_HINT_T0);
  }
}

// Segments of up to this many rows take their deltas with B loaded and widened in registers
// (direct_deltas) rather than through a float32 copy of each chunk (widened_deltas), which
// so few rows would read once or twice; measured faster at 32-64 adapters, and slower for 4-row
// slots (benchmarks/NOTES.md).
constexpr int64_t kDirectRows = 2;

// Rows [m0, m0 + NR) of one segment, 16 * NV columns from n0: the sums plus sum_r h[m, r] B[r, n]
// with B[r, n0 + j] read as float32 from b[r * b_rank_stride + j] (BV: B's own dtype T, or the
// float32 copy bw of the chunk), each output rounded and stored once. NR rows x NV vectors x NP
// partial sums over the ranks keep eight FMA chains apart, so the FMAs wait on throughput rather
// than each one's latency.
template <typename T, int NR, int NV, typename BV>
void delta_rows(const Shared& s, const ColumnSums& c, int64_t rank, int64_t m0, int64_t n0, const BV* b,
                int64_t b_rank_stride) {
  constexpr int NP = NR * NV >= 8 ? 1 : 8 / (NR * NV);
  __mmask16 mask[NV];
  __m512 acc[NR][NV][NP];
  const float* h[NR];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) mask[v] = first_lanes(c.n_end - n0 - v * kTile);
#pragma GCC unroll 8
  for (int i = 0; i < NR; ++i) {
    h[i] = s.h + (m0 + i) * s.h_stride;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[i][v][0] = _mm512_load_ps(c.at(m0 + i, n0 + v * kTile));
#pragma GCC unroll 8
      for (int p = 1; p < NP; ++p) acc[i][v][p] = _mm512_setzero_ps();
    }
  }
  auto rank_step = [&](int64_t r, int p) __attribute__((always_inline)) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = avx512::load_16_lanes(b + r * b_rank_stride + v * kTile, mask[v]);
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i) {
      const __m512 hv = _mm512_set1_ps(h[i][r]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v][p] = _mm512_fmadd_ps(hv, bv[v], acc[i][v][p]);
    }
  };
  int64_t r = 0;
  for (; r + NP <= rank; r += NP) {
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) rank_step(r + p, p);
  }
  for (; r < rank; ++r) rank_step(r, 0);
#pragma GCC unroll 8
  for (int i = 0; i < NR; ++i) {
    T* out = static_cast<T*>(s.g.out) + s.lora.order[m0 + i] * s.g.out_row_stride + n0;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
#pragma GCC unroll 8
      for (int p = 1; p < NP; ++p) acc[i][v][0] = _mm512_add_ps(acc[i][v][0], acc[i][v][p]);
      avx512::store_16_lanes(out + v * kTile, acc[i][v][0], mask[v]);
    }
  }
}

// The deltas of segment `segment`'s NR rows (NR <= kDirectRows) along the thread's columns, 64 at
// a time, then 16 at a time.
template <typename T, int NR>
void direct_deltas(const Shared& s, size_t segment, const ColumnSums& c) {
  const AmxSegment& seg = s.lora.segments[segment];
  const T* b = static_cast<const T*>(seg.b);
  constexpr int kVectors = 4;
  int64_t n0 = c.n_begin;
  for (; n0 + kVectors * kTile <= c.n_end; n0 += kVectors * kTile) {
    for (int v = 0; v < kVectors; ++v) prefetch_b_ahead<T>(s, c, segment, (n0 - c.n_begin) / kTile + v);
    delta_rows<T, NR, kVectors>(s, c, seg.rank, seg.first, n0, b + n0, s.lora.b_rank_stride);
  }
  for (; n0 < c.n_end; n0 += kTile) {
    prefetch_b_ahead<T>(s, c, segment, (n0 - c.n_begin) / kTile);
    delta_rows<T, NR, 1>(s, c, seg.rank, seg.first, n0, b + n0, s.lora.b_rank_stride);
  }
}

// The deltas of segment `segment`'s rows along the thread's columns, 16 at a time, through a
// float32 copy of B's chunk (bw) that every block of 8/4/2/1 rows reads.
template <typename T>
void widened_deltas(const Shared& s, size_t segment, const ColumnSums& c, float* bw) {
  const AmxSegment& seg = s.lora.segments[segment];
  const int64_t end = seg.first + seg.count;
  for (int64_t n0 = c.n_begin; n0 < c.n_end; n0 += kTile) {
    prefetch_b_ahead<T>(s, c, segment, (n0 - c.n_begin) / kTile);
    widen_b<T>(s, seg, n0, bw);
    int64_t m = seg.first;
    for (; m + 8 <= end; m += 8) delta_rows<T, 8, 1>(s, c, seg.rank, m, n0, bw, kTile);
    if (m + 4 <= end) {
      delta_rows<T, 4, 1>(s, c, seg.rank, m, n0, bw, kTile);
      m += 4;
    }
    if (m + 2 <= end) {
      delta_rows<T, 2, 1>(s, c, seg.rank, m, n0, bw, kTile);
      m += 2;
    }
    if (m < end) delta_rows<T, 1, 1>(s, c, seg.rank, m, n0, bw, kTile);
  }
}

// Step 3's deltas, one segment at a time along the thread's columns, so that each of its ranks'
// rows of B streams through memory in order; every output is rounded and stored once.
template <typename T>
void add_deltas_and_store(const Shared& s, const ColumnSums& c, float* bw) {
  static_assert(kDirectRows == 2, "one instantiation of direct_deltas per row count below");
  const bool rank_major_b = s.lora.b_out_stride == 1;
  int64_t done = 0;  // rows of the plan's order stored so far
  for (size_t i = 0; i < s.lora.segments.size(); ++i) {
    const AmxSegment& seg = s.lora.segments[i];
    store_rows<T>(s, done, seg.first, c);
    if (!rank_major_b || seg.count > kDirectRows) {
      widened_deltas<T>(s, i, c, bw);
    } else if (seg.count == 2) {
      direct_deltas<T, 2>(s, i, c);
    } else {
      direct_deltas<T, 1>(s, i, c);
    }
    done = seg.first + seg.count;
  }
  store_rows<T>(s, done, s.g.m, c);
}

// Step 2 for a small segment on the item kernel (AmxLoraArgs::item_shrink), through `u` (room for
// kAmxItemShrinkRows x R floats).
void item_shrink_task(const Shared& s, int64_t segment, float* u) {
  const AmxSegment& seg = s.lora.segments[segment];
  s.lora.item_shrink(s.lora.items[segment], /*xs=*/nullptr, 0, seg.rank, u);
  for (int64_t i = 0; i < seg.count; ++i) {
    std::copy(u + i * seg.rank, u + (i + 1) * seg.rank, s.h + (seg.first + i) * s.h_stride);
  }
}

template <typename T>
void run(const BaseGemmArgs& g, const AmxLoraArgs& lora) {
  const int64_t steps = (g.k + kStepK - 1) / kStepK, blocks = (g.m + kTile - 1) / kTile;
  const int64_t col_blocks = (g.n + kTile - 1) / kTile;
  const int64_t h_stride = (lora.max_rank + kTile - 1) / kTile * kTile;
  const int64_t packed_size = blocks * steps * kTile * kStepK;  // bfloat16 values per packed copy
  thread_local ReusedBuffer pairs_buffer, h_buffer;
  bf16* pairs = aligned(reinterpret_cast<bf16*>(pairs_buffer.get((kSplit<T> ? 2 : 1) * packed_size / 2 + 16)));
  const Shared s{g, lora, steps, blocks, pairs, pairs + packed_size, h_buffer.get(g.m * h_stride), h_stride};
  const int64_t segments = static_cast<int64_t>(lora.segments.size());
  std::vector<std::pair<int64_t, int64_t>> shrink_tasks;  // (segment, r0); r0 = -1: on the item kernel
  for (int64_t i = 0; i < segments; ++i) {
    if (lora.item_shrink != nullptr && lora.segments[i].count <= kAmxItemShrinkRows) {
      shrink_tasks.emplace_back(i, -1);
      continue;
    }
    for (int64_t r0 = 0; r0 < lora.segments[i].rank; r0 += kTile) shrink_tasks.emplace_back(i, r0);
  }
  const int64_t tasks = static_cast<int64_t>(shrink_tasks.size());
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    thread_local ReusedBuffer scratch_buffer, bw_buffer, sums_buffer;
    // room for two RowTiles copies (bfloat16 values; the buffer counts floats): bfloat16's two
    // column blocks, or float16's one block of two parts
    bf16* scratch = aligned(reinterpret_cast<bf16*>(scratch_buffer.get(RowTiles<T>::scratch_size(steps) + 16)));
    float* bw = aligned(bw_buffer.get(h_stride * kTile + 16));
    configure_tiles();
    for (int64_t u = blocks * steps * t / threads; u < blocks * steps * (t + 1) / threads; ++u) {
      pack_block<T>(s, u / steps, u % steps);
    }
#pragma omp barrier
    for (int64_t i = t; i < tasks; i += threads) {
      const auto [segment, r0] = shrink_tasks[i];
      if (r0 >= 0) {
        shrink_task<T>(s, lora.segments[segment], r0, scratch);
      } else {
        item_shrink_task(s, segment, bw);
      }
    }
#pragma omp barrier
    const int64_t begin = col_blocks * t / threads, end = col_blocks * (t + 1) / threads;
    const int64_t stride = (end - begin) * kTile;
    const ColumnSums c{aligned(sums_buffer.get(g.m * stride + 16)), stride, begin * kTile, std::min(g.n, end * kTile)};
    if constexpr (kSplit<T>) {
      base_columns_f16(s, begin, end, scratch, c);
    } else {
      base_columns_bf16(s, begin, end, scratch, c);
    }
    add_deltas_and_store<T>(s, c, bw);
    _tile_release();
  }
}

}  // namespace

void amx_linear_lora(const BaseGemmArgs& g, const AmxLoraArgs& lora) {
  if (g.dtype == c10::ScalarType::Half) {
    run<c10::Half>(g, lora);
  } else {
    run<bf16>(g, lora);
  }
}

}  // namespace cpu
}  // namespace lora_ext

#include "cpu/avx512_end.h"
#else
namespace lora_ext {
namespace cpu {
void amx_linear_lora(const BaseGemmArgs&, const AmxLoraArgs&) {}
}  // namespace cpu
}  // namespace lora_ext
#endif  // LORA_EXT_HAVE_AMX
