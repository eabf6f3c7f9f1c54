// The AVX-512 base GEMM of linear_lora (see base_gemm.h): tiles of up to 4 rows x 6 columns,
// 24 accumulators of 16-wide partial sums along k, reduced once per tile. The weight rows of a
// tile stay in L1 while every row block of x runs against them.
#include "cpu/base_gemm.h"

#include <algorithm>
#include <array>
#include <utility>

#include "cpu/avx512_isa.h"
#include "cpu/item_kernels.h"

namespace lora_ext {
namespace cpu {

#ifdef LORA_EXT_HAVE_AVX512
#include "cpu/avx512_begin.h"

namespace {

constexpr int kGemmTileRows = 4;
constexpr int kGemmTileCols = 6;

// out[m0 .. m0 + MB, n0 .. n0 + NB) = x-rows . w-rows (+ bias)
template <int MB, int NB>
void tile(const BaseGemmArgs& g, int64_t m0, int64_t n0) {
  const float* x[MB];
  const float* w[NB];
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i) x[i] = g.x + (m0 + i) * g.x_row_stride;
#pragma GCC unroll 6
  for (int j = 0; j < NB; ++j) w[j] = g.w + (n0 + j) * g.w_row_stride;
  __m512 acc[MB][NB];
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 6
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  auto step = [&](int64_t k, __mmask16 m) __attribute__((always_inline)) {
    __m512 wv[NB];
#pragma GCC unroll 6
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_maskz_loadu_ps(m, w[j] + k);
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x[i] + k);
#pragma GCC unroll 6
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  };
  int64_t k = 0;
  for (; k + 16 <= g.k; k += 16) step(k, 0xFFFF);
  if (k < g.k) step(k, first_lanes(g.k - k));
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i) {
    float* o = g.out + (m0 + i) * g.out_row_stride + n0;
#pragma GCC unroll 6
    for (int j = 0; j < NB; ++j) o[j] = _mm512_reduce_add_ps(acc[i][j]) + (g.bias != nullptr ? g.bias[n0 + j] : 0.f);
  }
}

using TileFn = void (*)(const BaseGemmArgs&, int64_t, int64_t);

template <int MB, int... NB>
constexpr std::array<TileFn, sizeof...(NB)> row_of_tiles(std::integer_sequence<int, NB...>) {
  return {&tile<MB, NB + 1>...};
}

// kTiles[rows - 1][cols - 1]
const std::array<std::array<TileFn, kGemmTileCols>, kGemmTileRows> kTiles = {
    row_of_tiles<1>(std::make_integer_sequence<int, kGemmTileCols>{}),
    row_of_tiles<2>(std::make_integer_sequence<int, kGemmTileCols>{}),
    row_of_tiles<3>(std::make_integer_sequence<int, kGemmTileCols>{}),
    row_of_tiles<4>(std::make_integer_sequence<int, kGemmTileCols>{})};

}  // namespace

void base_gemm_columns(const BaseGemmArgs& g, int64_t n_begin, int64_t n_end) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kGemmTileCols) {
    const int64_t cols = std::min<int64_t>(kGemmTileCols, n_end - n0);
    for (int64_t m0 = 0; m0 < g.m; m0 += kGemmTileRows) {
      const int64_t rows = std::min<int64_t>(kGemmTileRows, g.m - m0);
      kTiles[rows - 1][cols - 1](g, m0, n0);
    }
  }
}

#include "cpu/avx512_end.h"
#else
void base_gemm_columns(const BaseGemmArgs&, int64_t, int64_t) {}
#endif  // LORA_EXT_HAVE_AVX512

}  // namespace cpu
}  // namespace lora_ext
