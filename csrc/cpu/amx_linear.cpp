// The AMX path of linear_lora (amx_linear.h): three steps in one parallel region, a barrier
// between them.
//  1. Pack: x's rows, in the plan's order, 16 to a block, into the tile unit's pair layout
//     (pairs[block][k / 2][row][k % 2]), zero-padded to whole tiles.
//  2. Shrink: h[row, r] = scale * <A[r], x[row]> for each slot's rows: tile products of 16 ranks of
//     A (read straight from memory) with the packed blocks that hold the slot's rows. One task per
//     (slot, 16 ranks).
//  3. Base and deltas, by blocks of 16 output columns split over threads: the base GEMM computed
//     transposed, (W x^T) tiles of 16 columns x 16 rows with W's rows read straight from memory
//     as the left operand (the weight is never repacked); each finished tile is transposed in
//     registers and kept, with the bias, as float32 for the thread's columns. Then, one slot at a
//     time along those columns (B's rows stream in order), each row's delta sum_r h[row, r] B[n, r]
//     is added with float32 FMAs and the row is rounded to bfloat16 once.
// Tiles: 0-3 float32 sums, 4-5 left operands (W or A), 6-7 right operands (packed x).
#include "cpu/amx_linear.h"

#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>

#include "cpu/avx512_isa.h"
#include "cpu/item_kernels.h"
#include "cpu/work.h"

#if defined(LORA_EXT_HAVE_AVX512) && defined(__linux__)
#define LORA_EXT_HAVE_AMX 1
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

}  // namespace cpu
}  // namespace lora_ext

#ifdef LORA_EXT_HAVE_AMX
#include "cpu/avx512_begin.h"
#pragma GCC target("avx512bf16,amx-tile,amx-bf16")

#include "cpu/avx512_lanes.h"

namespace lora_ext {
namespace cpu {
namespace {

using bf16 = c10::BFloat16;
constexpr int64_t kTile = 16;       // rows of every tile; columns of the float32 ones
constexpr int64_t kStepK = 32;      // values of k per tile product
constexpr int64_t kTileBytes = 64;  // bytes per tile row

// The tile unit's loads and stores are inline assembly that the compiler does not see touch
// memory; this keeps ordinary loads and stores on the right side of them.
inline void compiler_barrier() { asm volatile("" ::: "memory"); }

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void configure_tiles() {
  TileConfig c{};
  c.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    c.colsb[i] = kTileBytes;
    c.rows[i] = kTile;
  }
  _tile_loadconfig(&c);
}

// A 16 x 16 transpose of 32-bit values: afterwards r[i] holds element i of every former row.
inline void transpose_16x16(__m512i (&r)[16]) {
  __m512i t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // r[4i + j], 128-bit lane L: element 4L + j of rows 4i .. 4i + 3
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512i low0 = _mm512_shuffle_i32x4(r[j], r[4 + j], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i high0 = _mm512_shuffle_i32x4(r[j], r[4 + j], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i low1 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i high1 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], _MM_SHUFFLE(3, 2, 3, 2));
    t[j] = _mm512_shuffle_i32x4(low0, low1, _MM_SHUFFLE(2, 0, 2, 0));
    t[4 + j] = _mm512_shuffle_i32x4(low0, low1, _MM_SHUFFLE(3, 1, 3, 1));
    t[8 + j] = _mm512_shuffle_i32x4(high0, high1, _MM_SHUFFLE(2, 0, 2, 0));
    t[12 + j] = _mm512_shuffle_i32x4(high0, high1, _MM_SHUFFLE(3, 1, 3, 1));
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// A float32 tile as stored from the tile unit (16 rows of 16), transposed.
inline void load_transposed(const float (&tile)[kTile][kTile], __m512i (&r)[16]) {
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(tile[i]);
  transpose_16x16(r);
}

// What every step reads: the shapes, the packed rows and h.
struct Shared {
  const BaseGemmArgs& g;
  const AmxLoraArgs& lora;
  int64_t steps;        // tile products along k: ceil(k / 32)
  int64_t blocks;       // blocks of 16 rows: ceil(m / 16)
  bf16* pairs;          // blocks x steps x (16 pairs of k x 16 rows x 2)
  float* h;             // (m, h_stride): row m' of the plan's order, scale included
  int64_t h_stride;
  std::vector<int64_t> first_segment;  // per block: the first segment that ends past its start

  const bf16* packed(int64_t block, int64_t step) const { return pairs + (block * steps + step) * kTile * kStepK; }
  int64_t rows_in(int64_t block) const { return std::min<int64_t>(kTile, g.m - block * kTile); }
};

// Step 1 for (block, step): 16 rows x 32 values of k, transposed as 32-bit pairs.
void pack_block(const Shared& s, int64_t block, int64_t step) {
  const BaseGemmArgs& g = s.g;
  const int64_t k0 = step * kStepK, left = g.k - k0;
  const __mmask32 mask = left >= kStepK ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << left) - 1);
  __m512i r[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    const int64_t m = block * kTile + i;
    r[i] = m < g.m ? _mm512_maskz_loadu_epi16(
                         mask, static_cast<const bf16*>(g.x) + s.lora.order[m] * g.x_row_stride + k0)
                   : _mm512_setzero_si512();
  }
  transpose_16x16(r);
  bf16* dst = const_cast<bf16*>(s.packed(block, step));
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * kStepK, r[i]);
}

// 16 rows of a row-major bfloat16 matrix as left operands, 32 values of k per step: straight
// from memory when 16 rows can be read there, else from a zero-padded copy of the `used` rows;
// a last step of fewer than 32 values always from a zero-padded copy of its values.
class RowTiles {
 public:
  // scratch: room for 16 x 32 x steps values
  RowTiles(const bf16* rows, int64_t row_stride, int64_t used, int64_t readable, int64_t k, int64_t steps,
           bf16* scratch) {
    if (readable >= kTile) {
      direct_ = rows;
      stride_ = row_stride;
      full_steps_ = k / kStepK;
      if (full_steps_ < steps) {
        tail_ = scratch;
        copy_rows(rows, row_stride, kTile, full_steps_ * kStepK, k, scratch, kStepK);
      }
    } else {
      direct_ = scratch;
      stride_ = steps * kStepK;
      full_steps_ = steps;
      copy_rows(rows, row_stride, used, 0, k, scratch, stride_);
    }
    compiler_barrier();
  }
  const void* at(int64_t step) const { return step < full_steps_ ? direct_ + step * kStepK : tail_; }
  int64_t stride_bytes(int64_t step) const {
    return step < full_steps_ ? stride_ * static_cast<int64_t>(sizeof(bf16)) : kTileBytes;
  }

 private:
  // dst[i, :width] = rows[i, k_begin:k_end] for i < used, zero elsewhere
  static void copy_rows(const bf16* rows, int64_t row_stride, int64_t used, int64_t k_begin, int64_t k_end,
                        bf16* dst, int64_t width) {
    for (int64_t i = 0; i < kTile; ++i) {
      for (int64_t k = 0; k < width; k += kStepK) {
        const int64_t left = i < used ? std::max<int64_t>(0, std::min<int64_t>(kStepK, k_end - k_begin - k)) : 0;
        const __mmask32 mask = left >= kStepK ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << left) - 1);
        _mm512_storeu_si512(dst + i * width + k,
                            _mm512_maskz_loadu_epi16(mask, rows + i * row_stride + k_begin + k));
      }
    }
  }

  const bf16* direct_ = nullptr;
  const bf16* tail_ = nullptr;
  int64_t stride_ = 0, full_steps_ = 0;
};

// Step 2 for 16 ranks from r0 of one segment.
void shrink_task(const Shared& s, const AmxSegment& seg, int64_t r0, bf16* scratch) {
  const AmxLoraArgs& lora = s.lora;
  const RowTiles a(seg.a + r0 * lora.a_rank_stride, lora.a_rank_stride, std::min(kTile, seg.rank - r0),
                   lora.max_rank - r0, s.g.k, s.steps, scratch);
  const int64_t last_block = (seg.first + seg.count - 1) / kTile;
  for (int64_t block = seg.first / kTile; block <= last_block; block += 2) {
    const bool two = block + 1 <= last_block;
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t step = 0; step < s.steps; ++step) {
      _tile_loadd(4, a.at(step), a.stride_bytes(step));
      _tile_loadd(6, s.packed(block, step), kTileBytes);
      _tile_dpbf16ps(0, 4, 6);
      if (two) {
        _tile_loadd(7, s.packed(block + 1, step), kTileBytes);
        _tile_dpbf16ps(1, 4, 7);
      }
    }
    alignas(64) float sums[2][kTile][kTile];
    _tile_stored(0, sums[0], kTileBytes);
    _tile_stored(1, sums[1], kTileBytes);
    compiler_barrier();
    const __mmask16 ranks = first_lanes(seg.rank - r0);
    const __m512 scale = _mm512_set1_ps(seg.scale);
    for (int half = 0; half < (two ? 2 : 1); ++half) {
      __m512i r[16];
      load_transposed(sums[half], r);  // r[i]: the 16 ranks of the block's row i
      const int64_t base = (block + half) * kTile;
      const int64_t begin = std::max<int64_t>(seg.first, base) - base;
      const int64_t end = std::min<int64_t>(seg.first + seg.count, base + kTile) - base;
      for (int64_t i = begin; i < end; ++i) {
        _mm512_mask_storeu_ps(s.h + (base + i) * s.h_stride + r0, ranks,
                              _mm512_mul_ps(scale, _mm512_castsi512_ps(r[i])));
      }
    }
  }
}

// B[r, n0 .. n0 + 16) of one segment as float32, for r < rank (zero past d_out).
void widen_b(const Shared& s, const AmxSegment& seg, int64_t n0, float* bw) {
  const AmxLoraArgs& lora = s.lora;
  const int64_t cols = std::min<int64_t>(kTile, s.g.n - n0);
  if (lora.b_out_stride == 1) {
    for (int64_t r = 0; r < seg.rank; ++r) {
      _mm512_store_ps(bw + r * kTile, avx512::load_16_lanes(seg.b + r * lora.b_rank_stride + n0, first_lanes(cols)));
    }
    return;
  }
  for (int64_t r = 0; r < seg.rank; ++r) {
    for (int64_t j = 0; j < kTile; ++j) {
      bw[r * kTile + j] = j < cols ? static_cast<float>(seg.b[(n0 + j) * lora.b_out_stride + r * lora.b_rank_stride])
                                   : 0.f;
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
void store_tile(const Shared& s, const float (&tile)[kTile][kTile], int64_t n0, int64_t block, const ColumnSums& c) {
  const BaseGemmArgs& g = s.g;
  const __m512 bias = g.bias != nullptr
                          ? avx512::load_16_lanes(static_cast<const bf16*>(g.bias) + n0, first_lanes(g.n - n0))
                          : _mm512_setzero_ps();
  __m512i r[16];
  load_transposed(tile, r);
  const int64_t base = block * kTile, count = s.rows_in(block);
  for (int64_t i = 0; i < count; ++i) {
    _mm512_store_ps(c.at(base + i, n0), _mm512_add_ps(_mm512_castsi512_ps(r[i]), bias));
  }
}

// Step 3's base GEMM: column blocks [begin, end), two at a time, into `c`.
void base_columns(const Shared& s, int64_t begin, int64_t end, bf16* scratch, const ColumnSums& c) {
  const BaseGemmArgs& g = s.g;
  const bf16* w = static_cast<const bf16*>(g.w);
  const int64_t operand = kTile * kStepK * s.steps;
  for (int64_t col = begin; col < end; col += 2) {
    const bool two_cols = col + 1 < end;
    const int64_t n0 = col * kTile, n1 = n0 + kTile;
    const RowTiles w0(w + n0 * g.w_row_stride, g.w_row_stride, g.n - n0, g.n - n0, g.k, s.steps, scratch);
    const int64_t c1 = two_cols ? n1 : n0;  // without a second block, an unused copy of the first
    const RowTiles w1(w + c1 * g.w_row_stride, g.w_row_stride, g.n - c1, g.n - c1, g.k, s.steps, scratch + operand);
    for (int64_t block = 0; block < s.blocks; block += 2) {
      const bool two_rows = block + 1 < s.blocks;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t step = 0; step < s.steps; ++step) {
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
      store_tile(s, sums[0], n0, block, c);
      if (two_rows) store_tile(s, sums[1], n0, block + 1, c);
      if (two_cols) {
        store_tile(s, sums[2], n1, block, c);
        if (two_rows) store_tile(s, sums[3], n1, block + 1, c);
      }
    }
  }
}

// out[row of m', columns of c] = the sums rounded, for m' in [begin, end) (rows with no delta).
void store_rows(const Shared& s, int64_t begin, int64_t end, const ColumnSums& c) {
  for (int64_t m = begin; m < end; ++m) {
    bf16* out = static_cast<bf16*>(s.g.out) + s.lora.order[m] * s.g.out_row_stride;
    for (int64_t n0 = c.n_begin; n0 < c.n_end; n0 += kTile) {
      avx512::store_16_lanes(out + n0, _mm512_load_ps(c.at(m, n0)), first_lanes(c.n_end - n0));
    }
  }
}

// Step 3's deltas, one segment at a time along the thread's columns, so that each of its ranks'
// rows of B streams through memory in order; every output is rounded and stored once.
void add_deltas_and_store(const Shared& s, const ColumnSums& c, float* bw) {
  int64_t done = 0;  // rows of the plan's order stored so far
  for (const AmxSegment& seg : s.lora.segments) {
    store_rows(s, done, seg.first, c);
    for (int64_t n0 = c.n_begin; n0 < c.n_end; n0 += kTile) {
      widen_b(s, seg, n0, bw);
      const __mmask16 cols = first_lanes(c.n_end - n0);
      for (int64_t m = seg.first; m < seg.first + seg.count; ++m) {
        const float* h = s.h + m * s.h_stride;
        __m512 acc = _mm512_load_ps(c.at(m, n0));
        for (int64_t j = 0; j < seg.rank; ++j) {
          acc = _mm512_fmadd_ps(_mm512_set1_ps(h[j]), _mm512_load_ps(bw + j * kTile), acc);
        }
        avx512::store_16_lanes(static_cast<bf16*>(s.g.out) + s.lora.order[m] * s.g.out_row_stride + n0, acc, cols);
      }
    }
    done = seg.first + seg.count;
  }
  store_rows(s, done, s.g.m, c);
}

}  // namespace

void amx_linear_lora(const BaseGemmArgs& g, const AmxLoraArgs& lora) {
  const int64_t steps = (g.k + kStepK - 1) / kStepK, blocks = (g.m + kTile - 1) / kTile;
  const int64_t col_blocks = (g.n + kTile - 1) / kTile;
  const int64_t h_stride = (lora.max_rank + kTile - 1) / kTile * kTile;
  thread_local ReusedBuffer pairs_buffer, h_buffer;
  Shared s{g, lora, steps, blocks,
           reinterpret_cast<bf16*>(pairs_buffer.get(blocks * steps * kTile * kStepK / 2 + 32)), h_buffer.get(g.m * h_stride),
           h_stride, std::vector<int64_t>(blocks)};
  // the tile unit's operands: 64-byte aligned rows read fastest
  s.pairs = reinterpret_cast<bf16*>((reinterpret_cast<uintptr_t>(s.pairs) + 63) & ~uintptr_t{63});
  std::vector<std::pair<size_t, int64_t>> shrink_tasks;  // (segment, r0)
  const int64_t segments = static_cast<int64_t>(lora.segments.size());
  for (int64_t i = 0, block = 0; block < blocks; ++block) {
    while (i < segments && lora.segments[i].first + lora.segments[i].count <= block * kTile) ++i;
    s.first_segment[block] = i;
  }
  for (size_t i = 0; i < lora.segments.size(); ++i) {
    for (int64_t r0 = 0; r0 < lora.segments[i].rank; r0 += kTile) shrink_tasks.emplace_back(i, r0);
  }
  const int64_t tasks = static_cast<int64_t>(shrink_tasks.size());
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    thread_local ReusedBuffer scratch_buffer, bw_buffer, sums_buffer;
    bf16* scratch = reinterpret_cast<bf16*>(scratch_buffer.get(2 * kTile * kStepK * steps / 2 + 32));
    scratch = reinterpret_cast<bf16*>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t{63});
    float* bw = bw_buffer.get(h_stride * kTile + 16);
    bw = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(bw) + 63) & ~uintptr_t{63});
    configure_tiles();
    for (int64_t u = blocks * steps * t / threads; u < blocks * steps * (t + 1) / threads; ++u) {
      pack_block(s, u / steps, u % steps);
    }
#pragma omp barrier
    for (int64_t i = t; i < tasks; i += threads) {
      shrink_task(s, lora.segments[shrink_tasks[i].first], shrink_tasks[i].second, scratch);
    }
#pragma omp barrier
    const int64_t begin = col_blocks * t / threads, end = col_blocks * (t + 1) / threads;
    const int64_t stride = (end - begin) * kTile;
    float* sums = sums_buffer.get(g.m * stride + 16);
    const ColumnSums c{reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(sums) + 63) & ~uintptr_t{63}), stride,
                       begin * kTile, std::min(g.n, end * kTile)};
    base_columns(s, begin, end, scratch, c);
    add_deltas_and_store(s, c, bw);
    _tile_release();
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
