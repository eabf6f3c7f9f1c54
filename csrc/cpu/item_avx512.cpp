// The AVX-512 CPU item kernel (AVX-512 F/BW/VL/DQ, chosen at run time; the build itself never
// assumes the CPU it runs on). float16 and bfloat16 are widened to float32 in registers;
// every sum is a float32 FMA chain.
//   shrink: 4 ranks x 4 rows of accumulators stream A's rows once per item.
//   expand: B stored rank-major (stride 1 along d_out) is streamed along d_out with FMAs;
//           B in PEFT's layout (stride 1 along the rank) is read in 16x16 blocks, transposed
//           in registers, then the same FMAs along d_out.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "cpu/item_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define LORA_EXT_HAVE_AVX512_KERNEL 1
#include <immintrin.h>
#endif

namespace lora_ext {
namespace cpu {

bool cpu_has_avx512() {
#ifdef LORA_EXT_HAVE_AVX512_KERNEL
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

#ifdef LORA_EXT_HAVE_AVX512_KERNEL
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
// GCC 12 warns about an uninitialized variable inside its own avx512fintrin.h helpers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

constexpr int kRanksPerPass = 4;
constexpr int kRowsPerPass = 4;
constexpr int kRankMajorCols = 64;  // 4 vectors of 16 columns

inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << std::max<int64_t>(n, 0)) - 1u);
}

// 16 lanes as float32, the lanes outside `m` zero (never read from memory).
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(c10::Half* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// Round to nearest even, NaN stays a quiet NaN: the same rounding as c10::BFloat16.
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

template <typename T>
void rows_to_float(const ItemArgs& p, float* xs) {
  const T* x = static_cast<const T*>(p.x);
  for (int64_t i = 0; i < p.count; ++i) {
    const T* src = x + p.rows[i] * p.x_row_stride;
    for (int64_t k = 0; k < p.d_in; k += 16) {
      const __mmask16 m = first_lanes(p.d_in - k);
      _mm512_mask_storeu_ps(xs + i * p.d_in + k, m, load16(src + k, m));
    }
  }
}

// u[t0 + i, r0 + j] = scale * <A[r0 + j], x[t0 + i]> for j < NR, i < NT.
template <typename T, int NR, int NT>
void shrink_block(const ItemArgs& p, const float* xs, int64_t r0, int64_t t0, float* u) {
  const T* a = static_cast<const T*>(p.a) + r0 * p.a_rank_stride;
  __m512 acc[NR][NT];
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < NT; ++i) acc[j][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < p.d_in; k += 16) {
    const __mmask16 m = first_lanes(p.d_in - k);
    __m512 xv[NT];
    for (int i = 0; i < NT; ++i) xv[i] = _mm512_maskz_loadu_ps(m, xs + (t0 + i) * p.d_in + k);
    for (int j = 0; j < NR; ++j) {
      const __m512 av = load16(a + j * p.a_rank_stride + k, m);
      for (int i = 0; i < NT; ++i) acc[j][i] = _mm512_fmadd_ps(av, xv[i], acc[j][i]);
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < NT; ++i) u[(t0 + i) * p.rank + r0 + j] = p.scale * _mm512_reduce_add_ps(acc[j][i]);
}

template <typename T>
using ShrinkBlock = void (*)(const ItemArgs&, const float*, int64_t, int64_t, float*);

template <typename T, int NR>
ShrinkBlock<T> shrink_block_for_rows(int64_t rows) {
  switch (rows) {
    case 1: return &shrink_block<T, NR, 1>;
    case 2: return &shrink_block<T, NR, 2>;
    case 3: return &shrink_block<T, NR, 3>;
    default: return &shrink_block<T, NR, 4>;
  }
}

template <typename T>
ShrinkBlock<T> shrink_block_for(int64_t ranks, int64_t rows) {
  switch (ranks) {
    case 1: return shrink_block_for_rows<T, 1>(rows);
    case 2: return shrink_block_for_rows<T, 2>(rows);
    case 3: return shrink_block_for_rows<T, 3>(rows);
    default: return shrink_block_for_rows<T, 4>(rows);
  }
}

// out[row t0 + i, n0 : n0 + 16 * NV] (+)= acc[i]
template <typename T, int NT, int NV>
void store_rows(const ItemArgs& p, int64_t t0, int64_t n0, const __m512 (&acc)[NT][NV]) {
  T* out = static_cast<T*>(p.out);
  for (int i = 0; i < NT; ++i) {
    T* o = out + p.rows[t0 + i] * p.out_row_stride + n0;
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = first_lanes(p.d_out - n0 - 16 * v);
      if (m == 0) break;
      __m512 value = acc[i][v];
      if (p.accumulate) value = _mm512_add_ps(load16(o + 16 * v, m), value);
      store16(o + 16 * v, value, m);
    }
  }
}

// B rank-major (stride 1 along d_out): 64 columns, FMAs along d_out for NT rows.
template <typename T, int NT>
void expand_rank_major_block(const ItemArgs& p, const float* u, int64_t t0, int64_t n0) {
  constexpr int NV = kRankMajorCols / 16;
  const T* b = static_cast<const T*>(p.b) + n0;
  __mmask16 m[NV];
  for (int v = 0; v < NV; ++v) m[v] = first_lanes(p.d_out - n0 - 16 * v);
  __m512 acc[NT][NV];
  for (int i = 0; i < NT; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t r = 0; r < p.rank; ++r) {
    __m512 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load16(b + r * p.b_rank_stride + 16 * v, m[v]);
    for (int i = 0; i < NT; ++i) {
      const __m512 ur = _mm512_set1_ps(u[(t0 + i) * p.rank + r]);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(ur, bv[v], acc[i][v]);
    }
  }
  store_rows<T, NT, NV>(p, t0, n0, acc);
}

// In place: rows[j] lane i becomes rows[i] lane j (verified against a model of the intrinsics).
inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int q = 0; q < 16; q += 4) {
    const __m512d a = _mm512_castps_pd(t[q]), b = _mm512_castps_pd(t[q + 1]);
    const __m512d c = _mm512_castps_pd(t[q + 2]), d = _mm512_castps_pd(t[q + 3]);
    r[q] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int h = 0; h < 16; h += 8) {
    for (int j = 0; j < 4; ++j) {
      t[h + j] = _mm512_shuffle_f32x4(r[h + j], r[h + 4 + j], 0x88);
      t[h + 4 + j] = _mm512_shuffle_f32x4(r[h + j], r[h + 4 + j], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
}

// B in PEFT's layout (stride 1 along the rank): 16 columns, 16 ranks at a time.
template <typename T, int NT>
void expand_peft_block(const ItemArgs& p, const float* u, int64_t t0, int64_t n0) {
  const T* b = static_cast<const T*>(p.b) + n0 * p.b_out_stride;
  const int64_t cols = std::min<int64_t>(16, p.d_out - n0);
  __m512 acc[NT][1];
  for (int i = 0; i < NT; ++i) acc[i][0] = _mm512_setzero_ps();
  for (int64_t r0 = 0; r0 < p.rank; r0 += 16) {
    const __mmask16 m = first_lanes(p.rank - r0);
    __m512 block[16];  // block[c] lane r = B[n0 + c, r0 + r]; then transposed
    for (int c = 0; c < 16; ++c) {
      block[c] = c < cols ? load16(b + c * p.b_out_stride + r0, m) : _mm512_setzero_ps();
    }
    transpose16(block);  // block[r] lane c = B[n0 + c, r0 + r]
    const int64_t ranks_here = std::min<int64_t>(16, p.rank - r0);
    for (int64_t r = 0; r < ranks_here; ++r) {
      for (int i = 0; i < NT; ++i) {
        acc[i][0] = _mm512_fmadd_ps(_mm512_set1_ps(u[(t0 + i) * p.rank + r0 + r]), block[r], acc[i][0]);
      }
    }
  }
  store_rows<T, NT, 1>(p, t0, n0, acc);
}

using ExpandBlock = void (*)(const ItemArgs&, const float*, int64_t, int64_t);

template <typename T>
ExpandBlock expand_block_for(bool rank_major, int64_t rows) {
  if (rank_major) {
    switch (rows) {
      case 1: return &expand_rank_major_block<T, 1>;
      case 2: return &expand_rank_major_block<T, 2>;
      case 3: return &expand_rank_major_block<T, 3>;
      default: return &expand_rank_major_block<T, 4>;
    }
  }
  switch (rows) {
    case 1: return &expand_peft_block<T, 1>;
    case 2: return &expand_peft_block<T, 2>;
    case 3: return &expand_peft_block<T, 3>;
    default: return &expand_peft_block<T, 4>;
  }
}

template <typename T>
void item_avx512(const ItemArgs& p, Scratch& s) {
  s.x.resize(p.count * p.d_in);
  s.u.resize(p.count * p.rank);
  rows_to_float<T>(p, s.x.data());
  for (int64_t r0 = 0; r0 < p.rank; r0 += kRanksPerPass) {
    for (int64_t t0 = 0; t0 < p.count; t0 += kRowsPerPass) {
      shrink_block_for<T>(p.rank - r0, p.count - t0)(p, s.x.data(), r0, t0, s.u.data());
    }
  }
  const bool rank_major = p.b_out_stride == 1;
  const int64_t cols = rank_major ? kRankMajorCols : 16;
  for (int64_t n0 = 0; n0 < p.d_out; n0 += cols) {  // B's block stays in L1 across row groups
    for (int64_t t0 = 0; t0 < p.count; t0 += kRowsPerPass) {
      expand_block_for<T>(rank_major, p.count - t0)(p, s.u.data(), t0, n0);
    }
  }
}

}  // namespace

#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // LORA_EXT_HAVE_AVX512_KERNEL

ItemKernel avx512_item_kernel(c10::ScalarType dtype, const ItemArgs& example) {
#ifdef LORA_EXT_HAVE_AVX512_KERNEL
  const bool strides_fit = example.x_col_stride == 1 && example.a_col_stride == 1 &&
                           example.out_col_stride == 1 &&
                           (example.b_out_stride == 1 || example.b_rank_stride == 1);
  if (!strides_fit || !cpu_has_avx512()) return nullptr;
  switch (dtype) {
    case c10::ScalarType::Float: return &item_avx512<float>;
    case c10::ScalarType::Half: return &item_avx512<c10::Half>;
    default: return &item_avx512<c10::BFloat16>;
  }
#else
  (void)dtype;
  (void)example;
  return nullptr;
#endif
}

}  // namespace cpu
}  // namespace lora_ext
