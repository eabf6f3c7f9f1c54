// The AVX-512 CPU item kernel (AVX-512 F/BW/VL/DQ, chosen at run time; the build itself never
// assumes the CPU it runs on). float16 and bfloat16 are widened to float32 in registers;
// every sum is a float32 FMA chain.
//   shrink: 4 ranks x 4 rows of accumulators stream A's rows once per item.
//   expand: B stored rank-major (stride 1 along d_out) is streamed along d_out with FMAs;
//           B in PEFT's layout (stride 1 along the rank) is read in 16x16 blocks, transposed
//           in registers, then the same FMAs along d_out.
// The four-item kernel (quad_avx512.cpp) runs decode items four at a time.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "cpu/avx512_isa.h"
#include "cpu/item_kernels.h"

namespace lora_ext {
namespace cpu {

// The CPU checks run outside the AVX-512 region below: they must run on any x86-64 CPU.
// __builtin_cpu_supports takes only a literal, hence a macro.
#ifdef LORA_EXT_HAVE_AVX512
#define LORA_EXT_CPU_SUPPORTS(feature) (__builtin_cpu_init(), __builtin_cpu_supports(feature) != 0)
#else
#define LORA_EXT_CPU_SUPPORTS(feature) false
#endif

bool cpu_has_avx512() {
  return LORA_EXT_CPU_SUPPORTS("avx512f") && LORA_EXT_CPU_SUPPORTS("avx512bw") && LORA_EXT_CPU_SUPPORTS("avx512vl") &&
         LORA_EXT_CPU_SUPPORTS("avx512dq");
}

bool cpu_has_avx512_bf16() {
  static const bool has = LORA_EXT_CPU_SUPPORTS("avx512bf16");
  return has;
}

bool cpu_has_amx_bf16() {
  static const bool has = LORA_EXT_CPU_SUPPORTS("amx-bf16");
  return has;
}

bool cpu_has_avx512_fp16() {
  static const bool has = LORA_EXT_CPU_SUPPORTS("avx512fp16");
  return has;
}

#undef LORA_EXT_CPU_SUPPORTS

}  // namespace cpu
}  // namespace lora_ext

#ifdef LORA_EXT_HAVE_AVX512
#include "cpu/avx512_begin.h"

#include "cpu/avx512_lanes.h"

namespace lora_ext {
namespace cpu {
namespace {

using namespace avx512;

constexpr int kRanksPerPass = 4;
constexpr int kRowsPerPass = 4;
constexpr int kRankMajorCols = 128;  // columns per rank-major expand block (8 vectors)

// Pointers to the rows t0 .. t0 + NT - 1 of x, in x's own element type E.
template <typename E, int NT>
void row_pointers(const ItemArgs& p, int64_t t0, const E* (&x_rows)[NT]) {
#pragma GCC unroll 4
  for (int i = 0; i < NT; ++i) x_rows[i] = static_cast<const E*>(p.x) + p.rows[t0 + i] * p.x_row_stride;
}

// u[t0 + i, r0 + j] = scale * (sum of the lanes of every accumulator set), for j < NR, i < NT.
template <int kSets, int NR, int NT>
void store_shrink_sums(const ItemArgs& p, const __m512 (&acc)[kSets][NR][NT], int64_t r0, int64_t t0, float* u) {
#pragma GCC unroll 4
  for (int j = 0; j < NR; ++j) {
#pragma GCC unroll 4
    for (int i = 0; i < NT; ++i) {
      const __m512 sum = kSets == 2 ? _mm512_add_ps(acc[0][j][i], acc[kSets - 1][j][i]) : acc[0][j][i];
      u[(t0 + i) * p.rank + r0 + j] = p.scale * _mm512_reduce_add_ps(sum);
    }
  }
}

// u[t0 + i, r0 + j] = scale * <A[r0 + j], x[rows[t0 + i]]> for j < NR, i < NT, reading x in its
// own dtype. With few rows the k loop keeps two sets of accumulators, so enough FMA chains run at
// once to hide their latency.
template <typename T, int NR, int NT>
void shrink_block(const ItemArgs& p, const float* /*xs: unused, x is read directly*/, int64_t r0, int64_t t0,
                  float* u) {
  constexpr int kSets = NR * NT < 8 ? 2 : 1;
  const T* a = static_cast<const T*>(p.a) + r0 * p.a_rank_stride;
  const T* x_rows[NT];
  row_pointers(p, t0, x_rows);
  __m512 acc[kSets][NR][NT] = {};
  auto step = [&](int s, int64_t k, __mmask16 m) {
    __m512 xv[NT];
#pragma GCC unroll 4
    for (int i = 0; i < NT; ++i) xv[i] = load_16_lanes(x_rows[i] + k, m);
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      const __m512 av = load_16_lanes(a + j * p.a_rank_stride + k, m);
#pragma GCC unroll 4
      for (int i = 0; i < NT; ++i) acc[s][j][i] = _mm512_fmadd_ps(av, xv[i], acc[s][j][i]);
    }
  };
  const __mmask16 all = 0xFFFF;
  constexpr int64_t kAhead = kPrefetchBytes / sizeof(T);
  int64_t k = 0;
  for (; k + 16 * kSets <= p.d_in; k += 16 * kSets) {
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) prefetch_lines(a + j * p.a_rank_stride + k + kAhead, 16 * kSets * sizeof(T));
#pragma GCC unroll 2
    for (int s = 0; s < kSets; ++s) step(s, k + 16 * s, all);
  }
  for (; k < p.d_in; k += 16) step(0, k, first_lanes(p.d_in - k));
  store_shrink_sums(p, acc, r0, t0, u);
}

// bfloat16 shrink with AVX512-BF16 (chosen at run time where the CPU has it): vdpbf16ps multiplies
// pairs of bf16 values exactly and adds both products into float32 lanes, 32 MACs per instruction
// with no widening of x or A.
template <int NR, int NT>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
void shrink_block_dpbf16(const ItemArgs& p, const float* /*xs*/, int64_t r0, int64_t t0, float* u) {
  constexpr int kSets = NR * NT < 8 ? 2 : 1;
  const c10::BFloat16* a = static_cast<const c10::BFloat16*>(p.a) + r0 * p.a_rank_stride;
  const c10::BFloat16* x_rows[NT];
  row_pointers(p, t0, x_rows);
  __m512 acc[kSets][NR][NT] = {};
  auto step = [&](int s, int64_t k, __mmask32 m) __attribute__((always_inline)) {
    __m512bh xv[NT];
#pragma GCC unroll 4
    for (int i = 0; i < NT; ++i) xv[i] = (__m512bh)_mm512_maskz_loadu_epi16(m, x_rows[i] + k);
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      const __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(m, a + j * p.a_rank_stride + k);
#pragma GCC unroll 4
      for (int i = 0; i < NT; ++i) acc[s][j][i] = _mm512_dpbf16_ps(acc[s][j][i], av, xv[i]);
    }
  };
  constexpr int64_t kAhead = kPrefetchBytes / 2;
  const __mmask32 all = 0xFFFFFFFFu;
  int64_t k = 0;
  for (; k + 32 * kSets <= p.d_in; k += 32 * kSets) {
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) prefetch_lines(a + j * p.a_rank_stride + k + kAhead, 64 * kSets);
#pragma GCC unroll 2
    for (int s = 0; s < kSets; ++s) step(s, k + 32 * s, all);
  }
  for (; k < p.d_in; k += 32) {
    const int64_t left = p.d_in - k;
    step(0, k, left >= 32 ? all : static_cast<__mmask32>((1u << left) - 1u));
  }
  store_shrink_sums(p, acc, r0, t0, u);
}


template <typename T>
using ShrinkBlock = void (*)(const ItemArgs&, const float*, int64_t, int64_t, float*);

// Calls pick(std::integral_constant<int, N>{}) with N = count clamped to 1..4: picks the template
// instantiation of a block kernel for a run-time number of rows or ranks.
template <typename Pick>
auto by_count(int64_t count, Pick pick) {
  switch (count) {
    case 1: return pick(std::integral_constant<int, 1>{});
    case 2: return pick(std::integral_constant<int, 2>{});
    case 3: return pick(std::integral_constant<int, 3>{});
    default: return pick(std::integral_constant<int, 4>{});
  }
}

template <typename T, bool kDot>
ShrinkBlock<T> shrink_block_for(int64_t ranks, int64_t rows) {
  return by_count(ranks, [rows](auto nr) {
    return by_count(rows, [](auto nt) -> ShrinkBlock<T> {
      if constexpr (kDot) return &shrink_block_dpbf16<decltype(nr)::value, decltype(nt)::value>;
      else return &shrink_block<T, decltype(nr)::value, decltype(nt)::value>;
    });
  });
}

// out[row t0 + i, n0 : n0 + 16 * NV] (+)= acc[i]. Both loops fully unrolled: indexing acc with a
// run-time index would make the compiler keep every accumulator in memory, and store all of them
// to the stack at each step of the FMA loop that fills them (it did: the expand ran at a third of
// its FMA rate).
template <typename T, int NT, int NV>
__attribute__((always_inline)) inline void store_rows(const ItemArgs& p, int64_t t0, int64_t n0,
                                                      const __m512 (&acc)[NT][NV]) {
  T* out = static_cast<T*>(p.out);
#pragma GCC unroll 8
  for (int i = 0; i < NT; ++i) {
    T* o = out + p.rows[t0 + i] * p.out_row_stride + n0;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = first_lanes(p.d_out - n0 - 16 * v);
      if (m != 0) {
        __m512 value = acc[i][v];
        if (p.accumulate) value = _mm512_add_ps(load_16_lanes(o + 16 * v, m), value);
        store_16_lanes(o + 16 * v, value, m);
      }
    }
  }
}

// B rank-major (stride 1 along d_out): 16 * NV columns, FMAs along d_out for NT rows; NV * NT
// independent accumulators hide the FMA latency.
template <typename T, int NT, int NV>
void expand_rank_major_block(const ItemArgs& p, const float* u, int64_t t0, int64_t n0) {
  const T* b = static_cast<const T*>(p.b) + n0;
  __mmask16 m[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) m[v] = first_lanes(p.d_out - n0 - 16 * v);
  __m512 acc[NT][NV];
#pragma GCC unroll 4
  for (int i = 0; i < NT; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t r = 0; r < p.rank; ++r) {
    prefetch_lines(b + r * p.b_rank_stride + kRankMajorCols, 16 * NV * sizeof(T));  // the next block
    __m512 bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = load_16_lanes(b + r * p.b_rank_stride + 16 * v, m[v]);
#pragma GCC unroll 4
    for (int i = 0; i < NT; ++i) {
      const __m512 ur = _mm512_set1_ps(u[(t0 + i) * p.rank + r]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(ur, bv[v], acc[i][v]);
    }
  }
  store_rows<T, NT, NV>(p, t0, n0, acc);
}

// kRankMajorCols columns: one block of 8 vectors for a single row, two of 4 for more rows.
template <typename T, int NT>
void expand_rank_major(const ItemArgs& p, const float* u, int64_t t0, int64_t n0) {
  constexpr int kVectors = kRankMajorCols / 16;
  if constexpr (NT == 1) {
    expand_rank_major_block<T, 1, kVectors>(p, u, t0, n0);
  } else {
    expand_rank_major_block<T, NT, kVectors / 2>(p, u, t0, n0);
    if (n0 + 8 * kVectors < p.d_out) expand_rank_major_block<T, NT, kVectors / 2>(p, u, t0, n0 + 8 * kVectors);
  }
}

// B in PEFT's layout (stride 1 along the rank): 16 columns, 16 ranks at a time, transposed in
// registers; four accumulators per row (rank mod 4) hide the FMA latency.
template <typename T, int NT>
void expand_peft_block(const ItemArgs& p, const float* u, int64_t t0, int64_t n0) {
  const T* b = static_cast<const T*>(p.b) + n0 * p.b_out_stride;
  const int64_t cols = std::min<int64_t>(16, p.d_out - n0);
  __m512 acc[NT][4];
#pragma GCC unroll 4
  for (int i = 0; i < NT; ++i)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) acc[i][q] = _mm512_setzero_ps();
  // The rows of B a few blocks ahead (16 rows of rank elements, contiguous when B is).
  const int64_t block_bytes = 16 * p.b_out_stride * static_cast<int64_t>(sizeof(T));
  prefetch_lines(b + (kPrefetchBytes / block_bytes + 1) * 16 * p.b_out_stride, block_bytes);
  for (int64_t r0 = 0; r0 < p.rank; r0 += 16) {
    const __mmask16 m = first_lanes(p.rank - r0);
    __m512 block[16];  // block[c] lane r = B[n0 + c, r0 + r]; then transposed
#pragma GCC unroll 16
    for (int c = 0; c < 16; ++c) {
      block[c] = c < cols ? load_16_lanes(b + c * p.b_out_stride + r0, m) : _mm512_setzero_ps();
    }
    transpose16(block);  // block[r] lane c = B[n0 + c, r0 + r]; lanes of ranks >= rank are 0
    const float* u_block = u + t0 * p.rank + r0;
    const int64_t ranks_here = std::min<int64_t>(16, p.rank - r0);
    if (ranks_here == 16) {
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) {
#pragma GCC unroll 4
        for (int i = 0; i < NT; ++i) {
          acc[i][r % 4] = _mm512_fmadd_ps(_mm512_set1_ps(u_block[i * p.rank + r]), block[r], acc[i][r % 4]);
        }
      }
    } else {
      for (int64_t r = 0; r < ranks_here; ++r) {
#pragma GCC unroll 4
        for (int i = 0; i < NT; ++i) {
          acc[i][0] = _mm512_fmadd_ps(_mm512_set1_ps(u_block[i * p.rank + r]), block[r], acc[i][0]);
        }
      }
    }
  }
  __m512 total[NT][1];
#pragma GCC unroll 4
  for (int i = 0; i < NT; ++i) {
    total[i][0] = _mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), _mm512_add_ps(acc[i][2], acc[i][3]));
  }
  store_rows<T, NT, 1>(p, t0, n0, total);
}

using ExpandBlock = void (*)(const ItemArgs&, const float*, int64_t, int64_t);

template <typename T>
ExpandBlock expand_block_for(bool rank_major, int64_t rows) {
  return by_count(rows, [rank_major](auto nt) -> ExpandBlock {
    if (rank_major) return &expand_rank_major<T, decltype(nt)::value>;
    return &expand_peft_block<T, decltype(nt)::value>;
  });
}

// Asks for this task's share of the item's B (in proportion to its ranks) while the shrink
// computes, so the expand that follows finds B in cache instead of waiting on DRAM.
template <typename T>
void prefetch_share_of_b(const ItemArgs& p, int64_t rank_begin, int64_t rank_end) {
  if (!p.prefetch_b) return;
  const bool rank_major = p.b_out_stride == 1;
  const int64_t bytes = (rank_major ? p.rank * p.b_rank_stride : p.d_out * p.b_out_stride) *
                        static_cast<int64_t>(sizeof(T));
  const int64_t begin = bytes * rank_begin / p.rank, end = bytes * rank_end / p.rank;
  const char* base = static_cast<const char*>(p.b);
  for (int64_t off = begin & ~int64_t{63}; off < end; off += 64) _mm_prefetch(base + off, _MM_HINT_T1);
}

template <typename T, bool kDot>
void shrink(const ItemArgs& p, const float* xs, int64_t rank_begin, int64_t rank_end, float* u) {
  prefetch_share_of_b<T>(p, rank_begin, rank_end);
  for (int64_t r0 = rank_begin; r0 < rank_end; r0 += kRanksPerPass) {
    for (int64_t t0 = 0; t0 < p.count; t0 += kRowsPerPass) {
      shrink_block_for<T, kDot>(rank_end - r0, p.count - t0)(p, xs, r0, t0, u);
    }
  }
}

template <typename T>
void expand(const ItemArgs& p, const float* u, int64_t col_begin, int64_t col_end) {
  const bool rank_major = p.b_out_stride == 1;
  const int64_t cols = rank_major ? kRankMajorCols : 16;  // col_begin is a multiple of both
  for (int64_t n0 = col_begin; n0 < col_end; n0 += cols) {  // B's block stays in L1 across row groups
    for (int64_t t0 = 0; t0 < p.count; t0 += kRowsPerPass) {
      expand_block_for<T>(rank_major, p.count - t0)(p, u, t0, n0);
    }
  }
}

// kDot: the bfloat16 shrink uses vdpbf16ps (AVX512-BF16).
template <typename T, bool kDot = false>
ItemKernels kernels_for() {
  return {nullptr, &shrink<T, kDot>, &expand<T>, &quad_items<T, kDot>, &quad_shrink<T, kDot>,
          kDot ? KernelPath::kCpuItemsAvx512Bf16 : KernelPath::kCpuItemsAvx512};
}

}  // namespace
}  // namespace cpu
}  // namespace lora_ext

#include "cpu/avx512_end.h"
#endif  // LORA_EXT_HAVE_AVX512

namespace lora_ext {
namespace cpu {

bool avx512_item_kernels(c10::ScalarType dtype, const ItemArgs& example, ItemKernels* kernels) {
#ifdef LORA_EXT_HAVE_AVX512
  static_assert(kExpandTaskColumns % kRankMajorCols == 0 && kShrinkTaskRanks % kRanksPerPass == 0,
                "work is split where the kernel's blocks start");
  const bool strides_fit = example.x_col_stride == 1 && example.a_col_stride == 1 &&
                           example.out_col_stride == 1 &&
                           (example.b_out_stride == 1 || example.b_rank_stride == 1);
  if (!strides_fit || !cpu_has_avx512()) return false;
  switch (dtype) {
    case c10::ScalarType::Float: *kernels = kernels_for<float>(); break;
    case c10::ScalarType::Half: *kernels = kernels_for<c10::Half>(); break;
    default:
      // The cpu_avx512_bf16 setting "off" keeps the widening bfloat16 path (tests cover both).
      *kernels = cpu_has_avx512_bf16() && setting(Setting::kCpuAvx512Bf16) != 0
                     ? kernels_for<c10::BFloat16, true>()
                     : kernels_for<c10::BFloat16, false>();
  }
  return true;
#else
  (void)dtype;
  (void)example;
  (void)kernels;
  return false;
#endif
}

}  // namespace cpu
}  // namespace lora_ext
