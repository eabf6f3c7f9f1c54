// The AVX-512 base GEMM of linear_lora (see base_gemm.h): tiles of up to 4 rows x 6 columns,
// 24 accumulators of 16-wide float32 partial sums along k, reduced once per tile. The weight rows
// of a tile stay in cache while every row block of x runs against them, and each of those passes
// asks for its share of the next tile's weight rows (rows_prefetch.h). 16-bit inputs are widened to
// float32 as they load, or, for bfloat16 with AVX512-BF16, multiplied in pairs by vdpbf16ps
// (exact products, float32 sums, 32 values of k per instruction).
#include "cpu/base_gemm.h"

#include <algorithm>
#include <array>
#include <utility>

#include "cpu/avx512_isa.h"
#include "cpu/item_kernels.h"
#include "cpu/rows_prefetch.h"

#ifdef LORA_EXT_HAVE_AVX512
#include "cpu/avx512_begin.h"

#include "cpu/avx512_lanes.h"

namespace lora_ext {
namespace cpu {
namespace {

constexpr int kGemmTileRows = 4;
constexpr int kGemmTileCols = 6;
constexpr int64_t kWideningStepK = 16;  // values of k per step: one float32 vector
constexpr int64_t kDotStepK = 32;       // vdpbf16ps: 16 pairs

template <typename T, int MB, int NB>
struct Tile {
  const T* x[MB];
  const T* w[NB];
  __m512 acc[MB][NB];

  Tile(const BaseGemmArgs& g, int64_t m0, int64_t n0) {
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) x[i] = static_cast<const T*>(g.x) + (m0 + i) * g.x_row_stride;
#pragma GCC unroll 6
    for (int j = 0; j < NB; ++j) w[j] = static_cast<const T*>(g.w) + (n0 + j) * g.w_row_stride;
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 6
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  }

  // out[m0 + i, n0 + j] = the sum of acc[i][j]'s lanes + bias, rounded once to T
  void store(const BaseGemmArgs& g, int64_t m0, int64_t n0) const {
    const T* bias = static_cast<const T*>(g.bias);
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      T* o = static_cast<T*>(g.out) + (m0 + i) * g.out_row_stride + n0;
#pragma GCC unroll 6
      for (int j = 0; j < NB; ++j) {
        const float b = bias != nullptr ? static_cast<float>(bias[n0 + j]) : 0.f;
        o[j] = static_cast<T>(_mm512_reduce_add_ps(acc[i][j]) + b);
      }
    }
  }
};

// Widening tile: 16 values of k per step, each loaded as float32.
template <typename T, int MB, int NB>
__attribute__((always_inline)) inline void widening_step(Tile<T, MB, NB>& t, int64_t k, __mmask16 m) {
  __m512 wv[NB];
#pragma GCC unroll 6
  for (int j = 0; j < NB; ++j) wv[j] = avx512::load_16_lanes(t.w[j] + k, m);
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i) {
    const __m512 xv = avx512::load_16_lanes(t.x[i] + k, m);
#pragma GCC unroll 6
    for (int j = 0; j < NB; ++j) t.acc[i][j] = _mm512_fmadd_ps(xv, wv[j], t.acc[i][j]);
  }
}

template <typename T, int MB, int NB>
void widening_tile(const BaseGemmArgs& g, int64_t m0, int64_t n0, RowsPrefetch pf) {
  Tile<T, MB, NB> t(g, m0, n0);
  int64_t k = 0;
  for (; k + kWideningStepK <= g.k; k += kWideningStepK) {
    pf.step();
    widening_step(t, k, 0xFFFF);
  }
  if (k < g.k) widening_step(t, k, first_lanes(g.k - k));
  t.store(g, m0, n0);
}

#define LORA_EXT_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// bfloat16 tile with vdpbf16ps: 32 values of k per step (16 pairs per register).
template <int MB, int NB>
LORA_EXT_BF16_TARGET __attribute__((always_inline)) inline void dot_step(Tile<c10::BFloat16, MB, NB>& t, int64_t k,
                                                                          __mmask32 m) {
  __m512bh wv[NB];
#pragma GCC unroll 6
  for (int j = 0; j < NB; ++j) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(m, t.w[j] + k);
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i) {
    const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, t.x[i] + k);
#pragma GCC unroll 6
    for (int j = 0; j < NB; ++j) t.acc[i][j] = _mm512_dpbf16_ps(t.acc[i][j], xv, wv[j]);
  }
}

template <int MB, int NB>
LORA_EXT_BF16_TARGET void dot_tile(const BaseGemmArgs& g, int64_t m0, int64_t n0, RowsPrefetch pf) {
  Tile<c10::BFloat16, MB, NB> t(g, m0, n0);
  int64_t k = 0;
  for (; k + kDotStepK <= g.k; k += kDotStepK) {
    pf.step();
    dot_step(t, k, ~__mmask32{0});
  }
  if (k < g.k) dot_step(t, k, static_cast<__mmask32>((uint64_t{1} << (g.k - k)) - 1));
  t.store(g, m0, n0);
}

#undef LORA_EXT_BF16_TARGET

using TileFn = void (*)(const BaseGemmArgs&, int64_t, int64_t, RowsPrefetch);
using TileTable = std::array<std::array<TileFn, kGemmTileCols>, kGemmTileRows>;  // [rows - 1][cols - 1]

template <typename T, bool kDot, int MB, int NB>
constexpr TileFn tile_fn() {
  if constexpr (kDot) {
    return &dot_tile<MB, NB>;
  } else {
    return &widening_tile<T, MB, NB>;
  }
}

template <typename T, bool kDot, int MB, int... NB>
constexpr std::array<TileFn, sizeof...(NB)> row_of_tiles(std::integer_sequence<int, NB...>) {
  return {tile_fn<T, kDot, MB, NB + 1>()...};
}

template <typename T, bool kDot>
constexpr TileTable tile_table() {
  constexpr auto cols = std::make_integer_sequence<int, kGemmTileCols>{};
  return {row_of_tiles<T, kDot, 1>(cols), row_of_tiles<T, kDot, 2>(cols), row_of_tiles<T, kDot, 3>(cols),
          row_of_tiles<T, kDot, 4>(cols)};
}

bool uses_dot_tiles(const BaseGemmArgs& g) {
  return g.dtype == c10::ScalarType::BFloat16 && cpu_has_avx512_bf16() && setting(Setting::kCpuAvx512Bf16) != 0;
}

const TileTable& tiles_for(const BaseGemmArgs& g) {
  static const TileTable f32 = tile_table<float, false>(), f16 = tile_table<c10::Half, false>(),
                         bf16 = tile_table<c10::BFloat16, false>(), bf16_dot = tile_table<c10::BFloat16, true>();
  switch (g.dtype) {
    case c10::ScalarType::Half:
      return f16;
    case c10::ScalarType::BFloat16:
      return uses_dot_tiles(g) ? bf16_dot : bf16;
    default:
      return f32;
  }
}

}  // namespace

bool packed_gemm_fits(const BaseGemmArgs& g) {
  return g.dtype == c10::ScalarType::Float && g.k > 0 && g.m >= setting(Setting::kCpuPackedGemmMinRows);
}

// Float32 batches of many rows on packed blocks of W (packed_gemm_fits); otherwise tiles of
// kGemmTileCols columns in turn, each over every row block of x: the first pass of a tile reads its
// weight rows from memory, the later ones from cache; meanwhile each pass asks for its share of the
// next tile's weight rows (rows_prefetch.h).
void base_gemm_columns(const BaseGemmArgs& g, int64_t n_begin, int64_t n_end) {
  if (packed_gemm_fits(g)) {
    packed_gemm_columns(g, n_begin, n_end);
    return;
  }
  const TileTable& tiles = tiles_for(g);
  const int64_t steps = g.k / (uses_dot_tiles(g) ? kDotStepK : kWideningStepK);  // full steps per pass
  const int64_t passes = (g.m + kGemmTileRows - 1) / kGemmTileRows;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kGemmTileCols) {
    const int64_t cols = std::min<int64_t>(kGemmTileCols, n_end - n0);
    const int64_t next = n0 + kGemmTileCols;
    for (int64_t pass = 0; pass < passes; ++pass) {
      const int64_t m0 = pass * kGemmTileRows, rows = std::min<int64_t>(kGemmTileRows, g.m - m0);
      tiles[rows - 1][cols - 1](g, m0, n0,
                                next_weight_rows(g, next, std::min(next + kGemmTileCols, n_end), pass, passes, steps));
    }
  }
}

}  // namespace cpu
}  // namespace lora_ext

#include "cpu/avx512_end.h"
#else
namespace lora_ext {
namespace cpu {
bool packed_gemm_fits(const BaseGemmArgs&) { return false; }
void base_gemm_columns(const BaseGemmArgs&, int64_t, int64_t) {}
}  // namespace cpu
}  // namespace lora_ext
#endif  // LORA_EXT_HAVE_AVX512
