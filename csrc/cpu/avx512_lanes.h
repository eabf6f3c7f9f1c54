// What the AVX-512 CPU kernels share: 16-lane loads that widen float16/bfloat16 to float32 and
// stores that round back, software prefetch, a 16 x 16 transpose in registers, and the four-item
// kernel's entry point. Include only inside a region compiled for AVX-512 (#pragma GCC target, as
// item_avx512.cpp and quad_avx512.cpp do), after <immintrin.h>.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "cpu/item_kernels.h"

namespace lora_ext {
namespace cpu {
namespace avx512 {

// Software prefetch distance: far enough ahead that DRAM latency hides behind the FMAs.
constexpr int64_t kPrefetchBytes = 2048;

inline void prefetch_lines(const void* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) {
    _mm_prefetch(static_cast<const char*>(p) + off, _MM_HINT_T0);
  }
}

// 16 lanes as float32, the lanes outside `m` zero (never read from memory).
inline __m512 load_16_lanes(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_16_lanes(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
inline __m512 load_16_lanes(const c10::BFloat16* p, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

inline __m256i to_half_lanes(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// Round to nearest even, NaN stays a quiet NaN: the same rounding as c10::BFloat16.
inline __m256i to_bfloat16_lanes(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

inline void store_16_lanes(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store_16_lanes(c10::Half* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, to_half_lanes(v)); }
inline void store_16_lanes(c10::BFloat16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, to_bfloat16_lanes(v));
}

// All 16 lanes past the caches (non-temporal), for outputs written once and not read soon: no
// read-for-ownership of the destination lines. p must be aligned to the vector's size (64 bytes
// for float32, 32 for 16-bit types); a writer calls _mm_sfence() before other threads read.
inline void stream_16_lanes(float* p, __m512 v) { _mm512_stream_ps(p, v); }
inline void stream_16_lanes(c10::Half* p, __m512 v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_half_lanes(v));
}
inline void stream_16_lanes(c10::BFloat16* p, __m512 v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bfloat16_lanes(v));
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

// Shrink and expand of kQuadItems items in lockstep (ItemKernels::quad), in quad_avx512.cpp.
// kDot: the bfloat16 shrink with vdpbf16ps, as the one-item kernel chosen with it.
template <typename T, bool kDot>
void quad_items(const ItemArgs* const* q, float* const* u);
// The shrink alone of kQuadItems one-row items (quad_fits or not: B is not read), in lockstep.
template <typename T, bool kDot>
void quad_shrink(const ItemArgs* const* q, float* const* u);

}  // namespace avx512
}  // namespace cpu
}  // namespace lora_ext
