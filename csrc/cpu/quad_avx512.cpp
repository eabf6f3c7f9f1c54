// The four-item AVX-512 kernel (ItemKernels::quad): decode items of one row each, four at a time.
#include <algorithm>
#include <type_traits>

#include "cpu/avx512_isa.h"
#include "cpu/item_kernels.h"

#ifdef LORA_EXT_HAVE_AVX512
#include "cpu/avx512_begin.h"

#include "cpu/avx512_lanes.h"

namespace lora_ext {
namespace cpu {
namespace avx512 {
namespace {

// kQuadItems items of one row each with B rank-major (quad_fits), ranks in descending order: each
// step reads one rank row of every item's A (shrink) or B (expand) that has that rank, so four
// streams run through the items' contiguous A[:rank] and B[:rank] from start to end. The sums are
// those of shrink_block with one row (two accumulator sets along k) and of
// expand_rank_major_block (an FMA chain over the ranks from zero, added to out once), so results
// equal the one-item kernels' bit for bit. The expand keeps its partial sums in a float32 buffer
// of kQuadColumns columns per item (L1).
constexpr int64_t kQuadColumns = 1024;

// Calls run(std::integral_constant<int, N>{}, r_begin, r_end) over the ranks where exactly the first
// N items take part: [rank[N], rank[N - 1]) with rank[kQuadItems] = 0.
template <typename Run>
void by_active_items(const ItemArgs* const* q, Run run) {
  static_assert(kQuadItems == 4, "one segment per number of items taking part");
  int64_t r = 0;
  auto segment = [&](auto n) {
    const int64_t r_end = q[decltype(n)::value - 1]->rank;
    if (r < r_end) run(n, r, r_end);
    r = std::max(r, r_end);
  };
  segment(std::integral_constant<int, 4>{});
  segment(std::integral_constant<int, 3>{});
  segment(std::integral_constant<int, 2>{});
  segment(std::integral_constant<int, 1>{});
}

template <typename T, int N>
void quad_shrink_ranks(const ItemArgs* const* q, const T* const* x, int64_t r_begin, int64_t r_end,
                       float* const* u) {
  const int64_t d_in = q[0]->d_in;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const T* a[N];
#pragma GCC unroll 4
    for (int i = 0; i < N; ++i) a[i] = static_cast<const T*>(q[i]->a) + r * q[i]->a_rank_stride;
    __m512 acc[2][N];
#pragma GCC unroll 4
    for (int i = 0; i < N; ++i) acc[0][i] = acc[1][i] = _mm512_setzero_ps();
    auto step = [&](int s, int64_t k, __mmask16 m) __attribute__((always_inline)) {
#pragma GCC unroll 4
      for (int i = 0; i < N; ++i) acc[s][i] = _mm512_fmadd_ps(load_16_lanes(a[i] + k, m), load_16_lanes(x[i] + k, m), acc[s][i]);
    };
    int64_t k = 0;
    for (; k + 32 <= d_in; k += 32) {
      step(0, k, 0xFFFF);
      step(1, k + 16, 0xFFFF);
    }
    for (; k < d_in; k += 16) step(0, k, first_lanes(d_in - k));
#pragma GCC unroll 4
    for (int i = 0; i < N; ++i) u[i][r] = q[i]->scale * _mm512_reduce_add_ps(_mm512_add_ps(acc[0][i], acc[1][i]));
  }
}

// The bfloat16 shrink with AVX512-BF16, as shrink_block_dpbf16 computes it for one row (two
// accumulator sets, 32 elements a step).
template <int N>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
void quad_shrink_ranks_dpbf16(const ItemArgs* const* q, const c10::BFloat16* const* x, int64_t r_begin,
                              int64_t r_end, float* const* u) {
  const int64_t d_in = q[0]->d_in;
  const __mmask32 all = 0xFFFFFFFFu;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const c10::BFloat16* a[N];
#pragma GCC unroll 4
    for (int i = 0; i < N; ++i) a[i] = static_cast<const c10::BFloat16*>(q[i]->a) + r * q[i]->a_rank_stride;
    __m512 acc[2][N];
#pragma GCC unroll 4
    for (int i = 0; i < N; ++i) acc[0][i] = acc[1][i] = _mm512_setzero_ps();
    auto step = [&](int s, int64_t k, __mmask32 m) __attribute__((always_inline)) {
#pragma GCC unroll 4
      for (int i = 0; i < N; ++i) {
        acc[s][i] = _mm512_dpbf16_ps(acc[s][i], (__m512bh)_mm512_maskz_loadu_epi16(m, a[i] + k),
                                     (__m512bh)_mm512_maskz_loadu_epi16(m, x[i] + k));
      }
    };
    int64_t k = 0;
    for (; k + 64 <= d_in; k += 64) {
      step(0, k, all);
      step(1, k + 32, all);
    }
    for (; k < d_in; k += 32) {
      const int64_t left = d_in - k;
      step(0, k, left >= 32 ? all : static_cast<__mmask32>((1u << left) - 1u));
    }
#pragma GCC unroll 4
    for (int i = 0; i < N; ++i) u[i][r] = q[i]->scale * _mm512_reduce_add_ps(_mm512_add_ps(acc[0][i], acc[1][i]));
  }
}

// sums[i][:cols] (+)= sum over r in [r_begin, r_end) of u[i][r] * B_i[r, c0 : c0 + cols]; rank 0
// starts the chain from zero.
template <typename T, int N>
void quad_expand_ranks(const ItemArgs* const* q, const float* const* u, int64_t c0, int64_t cols, int64_t r_begin,
                       int64_t r_end, float (*sums)[kQuadColumns]) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    const T* b[N];
    __m512 ur[N];
#pragma GCC unroll 4
    for (int i = 0; i < N; ++i) {
      b[i] = static_cast<const T*>(q[i]->b) + r * q[i]->b_rank_stride + c0;
      ur[i] = _mm512_set1_ps(u[i][r]);
    }
    for (int64_t n = 0; n < cols; n += 16) {
      const __mmask16 m = first_lanes(cols - n);
#pragma GCC unroll 4
      for (int i = 0; i < N; ++i) {
        const __m512 prior = r == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(sums[i] + n);
        _mm512_storeu_ps(sums[i] + n, _mm512_fmadd_ps(ur[i], load_16_lanes(b[i] + n, m), prior));
      }
    }
  }
}

}  // namespace

template <typename T, bool kDot>
void quad_shrink(const ItemArgs* const* q, float* const* u) {
  const T* x[kQuadItems];
  for (int i = 0; i < kQuadItems; ++i) x[i] = static_cast<const T*>(q[i]->x) + q[i]->rows[0] * q[i]->x_row_stride;
  by_active_items(q, [&](auto n, int64_t r_begin, int64_t r_end) {
    if constexpr (kDot) {
      quad_shrink_ranks_dpbf16<decltype(n)::value>(q, x, r_begin, r_end, u);
    } else {
      quad_shrink_ranks<T, decltype(n)::value>(q, x, r_begin, r_end, u);
    }
  });
}

template <typename T, bool kDot>
void quad_items(const ItemArgs* const* q, float* const* u) {
  quad_shrink<T, kDot>(q, u);
  thread_local float sums[kQuadItems][kQuadColumns];
  const int64_t d_out = q[0]->d_out;
  for (int64_t c0 = 0; c0 < d_out; c0 += kQuadColumns) {
    const int64_t cols = std::min(kQuadColumns, d_out - c0);
    by_active_items(q, [&](auto n, int64_t r_begin, int64_t r_end) {
      quad_expand_ranks<T, decltype(n)::value>(q, u, c0, cols, r_begin, r_end, sums);
    });
    for (int i = 0; i < kQuadItems; ++i) {
      T* o = static_cast<T*>(q[i]->out) + q[i]->rows[0] * q[i]->out_row_stride + c0;
      for (int64_t n = 0; n < cols; n += 16) {
        const __mmask16 m = first_lanes(cols - n);
        __m512 value = _mm512_loadu_ps(sums[i] + n);
        if (q[i]->accumulate) value = _mm512_add_ps(load_16_lanes(o + n, m), value);
        store_16_lanes(o + n, value, m);
      }
    }
  }
}

template void quad_items<float, false>(const ItemArgs* const*, float* const*);
template void quad_items<c10::Half, false>(const ItemArgs* const*, float* const*);
template void quad_items<c10::BFloat16, false>(const ItemArgs* const*, float* const*);
template void quad_items<c10::BFloat16, true>(const ItemArgs* const*, float* const*);
template void quad_shrink<float, false>(const ItemArgs* const*, float* const*);
template void quad_shrink<c10::Half, false>(const ItemArgs* const*, float* const*);
template void quad_shrink<c10::BFloat16, false>(const ItemArgs* const*, float* const*);
template void quad_shrink<c10::BFloat16, true>(const ItemArgs* const*, float* const*);

}  // namespace avx512
}  // namespace cpu
}  // namespace lora_ext

#include "cpu/avx512_end.h"
#endif  // LORA_EXT_HAVE_AVX512
