// linear_lora's float32 base GEMM for batches of many rows (base_gemm.h), as outer products over
// a packed block of the weight. For each block of kPanelCols output columns and each chunk of
// kChunkK values of k, the chunk of W is transposed into a small k-major panel (kChunkK x 48
// floats, 24 KiB: it stays in L1), and every block of up to 8 rows of x then runs against it: per
// value of k, three panel vectors times 8 broadcast x values into 24 accumulators, no reductions.
// Each chunk's sums go into out (the first with the bias), so a sum over k is a chain of at most
// kChunkK FMAs per chunk plus one addition per chunk. The dot-product tiles of base_gemm_avx512.cpp
// re-read x for every 6 columns and reduce 24 vectors per tile; from a few dozen rows these run at
// the FMA units' rate instead (benchmarks/NOTES.md). Meanwhile each step asks for its share of the
// next column block's weight rows (rows_prefetch.h), as the tiles do.
#include <algorithm>
#include <array>
#include <utility>

#include "cpu/avx512_isa.h"
#include "cpu/base_gemm.h"
#include "cpu/rows_prefetch.h"

#ifdef LORA_EXT_HAVE_AVX512
#include "cpu/avx512_begin.h"

#include "cpu/avx512_lanes.h"

namespace lora_ext {
namespace cpu {
namespace {

constexpr int kPanelVectors = 3;
constexpr int64_t kPanelCols = 16 * kPanelVectors;  // output columns per block
constexpr int64_t kChunkK = 128;                    // values of k per panel
constexpr int kBlockRows = 8;                       // rows of x per micro-kernel call

// panel[k][c] = W[n0 + c][k0 + k] for k < kc and c < cols; 0 for the columns from cols up to the
// next multiple of 16 (their sums are computed and never stored). 16 x 16 blocks transposed in
// registers.
void pack_panel(const BaseGemmArgs& g, int64_t n0, int64_t cols, int64_t k0, int64_t kc, float* panel) {
  const float* w = static_cast<const float*>(g.w);
  for (int64_t c0 = 0; c0 < cols; c0 += 16) {
    for (int64_t k = 0; k < kc; k += 16) {
      const __mmask16 m = first_lanes(kc - k);
      __m512 block[16];
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c) {
        block[c] = c0 + c < cols ? avx512::load_16_lanes(w + (n0 + c0 + c) * g.w_row_stride + k0 + k, m)
                                 : _mm512_setzero_ps();
      }
      avx512::transpose16(block);  // block[j] lane c = W[n0 + c0 + c][k0 + k + j]
      const int64_t rows = std::min<int64_t>(16, kc - k);
      for (int64_t j = 0; j < rows; ++j) _mm512_store_ps(panel + (k + j) * kPanelCols + c0, block[j]);
    }
  }
}

// out[m0 + i, n0 + c] (+)= sum over the panel's kc values of x[m0 + i, k0 + k] panel[k][c], for
// i < MR and c < cols (cols <= 16 NV: the block's last columns need fewer vectors); `first` stores
// (with the bias) instead of adding.
template <int MR, int NV>
void panel_rows(const BaseGemmArgs& g, int64_t m0, int64_t k0, int64_t kc, const float* panel, int64_t n0,
                int64_t cols, bool first) {
  const float* x[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) x[i] = static_cast<const float*>(g.x) + (m0 + i) * g.x_row_stride + k0;
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    __m512 w[NV];
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) w[v] = _mm512_load_ps(panel + k * kPanelCols + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i][k]);
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(xv, w[v], acc[i][v]);
    }
  }
  const float* bias = static_cast<const float*>(g.bias);
#pragma GCC unroll 3
  for (int v = 0; v < NV; ++v) {
    const __mmask16 m = first_lanes(cols - 16 * v);  // not empty: NV covers cols
    const __m512 add = first ? (bias != nullptr ? _mm512_maskz_loadu_ps(m, bias + n0 + 16 * v) : _mm512_setzero_ps())
                             : __m512{};
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      float* o = static_cast<float*>(g.out) + (m0 + i) * g.out_row_stride + n0 + 16 * v;
      const __m512 before = first ? add : _mm512_maskz_loadu_ps(m, o);
      _mm512_mask_storeu_ps(o, m, _mm512_add_ps(before, acc[i][v]));
    }
  }
}

using PanelRowsFn = void (*)(const BaseGemmArgs&, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, bool);

template <int NV, int... MR>
constexpr std::array<PanelRowsFn, sizeof...(MR)> panel_rows_row(std::integer_sequence<int, MR...>) {
  return {&panel_rows<MR + 1, NV>...};
}

// [vectors - 1][rows - 1]
using PanelRowsTable = std::array<std::array<PanelRowsFn, kBlockRows>, kPanelVectors>;
constexpr PanelRowsTable panel_rows_table() {
  constexpr auto rows = std::make_integer_sequence<int, kBlockRows>{};
  return {panel_rows_row<1>(rows), panel_rows_row<2>(rows), panel_rows_row<3>(rows)};
}

}  // namespace

void packed_gemm_columns(const BaseGemmArgs& g, int64_t n_begin, int64_t n_end) {
  static constexpr PanelRowsTable kKernels = panel_rows_table();
  alignas(64) float panel[kChunkK * kPanelCols];
  const int64_t row_blocks = (g.m + kBlockRows - 1) / kBlockRows;
  const int64_t elem = sizeof(float), stride = g.w_row_stride * elem;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kPanelCols) {
    const int64_t cols = std::min<int64_t>(kPanelCols, n_end - n0);
    for (int64_t k0 = 0; k0 < g.k; k0 += kChunkK) {
      const int64_t kc = std::min<int64_t>(kChunkK, g.k - k0);
      pack_panel(g, n0, cols, k0, kc, panel);
      // The chunk packed next: this block's next one, or the next block's first.
      const bool last = k0 + kc >= g.k;
      const int64_t next_n = last ? n0 + kPanelCols : n0, next_k = last ? 0 : k0 + kc;
      const int64_t next_rows = std::min<int64_t>(kPanelCols, n_end - next_n);
      RowsPrefetch ahead = next_rows > 0 ? RowsPrefetch(static_cast<const char*>(g.w) + next_n * stride + next_k * elem,
                                                        next_rows, stride,
                                                        std::min<int64_t>(kChunkK, g.k - next_k) * elem, 0, 1,
                                                        row_blocks)
                                         : RowsPrefetch();
      for (int64_t m0 = 0; m0 < g.m; m0 += kBlockRows) {
        kKernels[(cols + 15) / 16 - 1][std::min<int64_t>(kBlockRows, g.m - m0) - 1](g, m0, k0, kc, panel, n0, cols,
                                                                                 k0 == 0);
        ahead.step();
      }
    }
  }
}

}  // namespace cpu
}  // namespace lora_ext

#include "cpu/avx512_end.h"
#else
namespace lora_ext {
namespace cpu {
void packed_gemm_columns(const BaseGemmArgs&, int64_t, int64_t) {}
}  // namespace cpu
}  // namespace lora_ext
#endif  // LORA_EXT_HAVE_AVX512
