// What the tile-unit (AMX) kernels share: whether this build can compile them, the tile shapes and
// configuration, 16 x 16 transposes, float16's split into bfloat16 parts and RowTiles, which reads
// 16 rows of a row-major matrix as left operands. amx_linear.cpp (linear_lora's AMX path) and
// amx_deltas.cpp (long segments' deltas) use them. The helpers are compiled for AVX-512 with
// AVX512-BF16 and the tile unit, and run only where amx_bf16_usable() (amx_linear.h) said yes.
#pragma once

#include "cpu/avx512_isa.h"

// The tile intrinsics need GCC 11 or Clang 12; the OS permission request is Linux's.
#if defined(__clang__)
#define LORA_EXT_COMPILER_HAS_AMX (__clang_major__ >= 12)
#elif defined(__GNUC__)
#define LORA_EXT_COMPILER_HAS_AMX (__GNUC__ >= 11)
#else
#define LORA_EXT_COMPILER_HAS_AMX 0
#endif
#if defined(LORA_EXT_HAVE_AVX512) && defined(__linux__) && LORA_EXT_COMPILER_HAS_AMX
#define LORA_EXT_HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#ifdef LORA_EXT_HAVE_AMX
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/avx512_begin.h"
#pragma GCC target("avx512bf16,amx-tile,amx-bf16")

namespace lora_ext {
namespace cpu {
namespace amx {

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

// Tiles 0-7 as 16 rows x 64 bytes. A constant in memory, built at compile time: the compiler's
// ldtilecfg is inline assembly that declares only the first 8 bytes of its operand read, so a
// configuration built on the stack just before it could be left half written (it was, once this
// function was inlined).
constexpr TileConfig tile_config() {
  TileConfig c{};
  c.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    c.colsb[i] = kTileBytes;
    c.rows[i] = kTile;
  }
  return c;
}
alignas(64) inline constexpr TileConfig kTileConfig = tile_config();

inline void configure_tiles() { _tile_loadconfig(&kTileConfig); }

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

// float16 has no tile product on this unit, but each float16 value is exactly the sum of two
// bfloat16 values (11 significant bits = 8 + the 3 the first leaves): hi = v truncated to bfloat16,
// lo = v - hi. x.W is then hi.hi + hi.lo + lo.hi with float32 sums (the dropped lo.lo is under
// 2^-14 of each product, 8x below float16's rounding, and float32 sums follow).
// 32 float16 values -> their bfloat16 high and low parts, in the same order.
inline void split_halves(__m512i halves, __m512i& hi, __m512i& lo) {
  const __m512 f0 = _mm512_cvtph_ps(_mm512_castsi512_si256(halves));
  const __m512 f1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(halves, 1));
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i h0 = _mm512_and_si512(_mm512_castps_si512(f0), top);
  const __m512i h1 = _mm512_and_si512(_mm512_castps_si512(f1), top);
  const __m512i l0 = _mm512_castps_si512(_mm512_sub_ps(f0, _mm512_castsi512_ps(h0)));
  const __m512i l1 = _mm512_castps_si512(_mm512_sub_ps(f1, _mm512_castsi512_ps(h1)));
  // the upper 16 bits of each 32-bit lane, f0's 16 lanes then f1's
  const __m512i odd_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29,
                                             27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  hi = _mm512_permutex2var_epi16(h0, odd_words, h1);
  lo = _mm512_permutex2var_epi16(l0, odd_words, l1);
}

inline __mmask32 first_of_32(int64_t n) {
  return n >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << std::max<int64_t>(n, 0)) - 1);
}

// bfloat16 operands are used as they are; float16 ones as their two parts.
template <typename T>
constexpr bool kSplit = std::is_same_v<T, c10::Half>;

// 16 rows of a row-major matrix as left operands, 32 values of k per step. bfloat16: straight
// from memory when 16 rows can be read there, else from a zero-padded copy of the `used` rows; a
// last step of fewer than 32 values always from a zero-padded copy of its values. float16: every
// step from a copy of the rows' high parts (at) and low parts (at_lo).
template <typename T>
class RowTiles {
 public:
  // Room the scratch needs, in bfloat16 values.
  static int64_t scratch_size(int64_t steps) { return (kSplit<T> ? 2 : 1) * kTile * kStepK * steps; }

  RowTiles(const T* rows, int64_t row_stride, int64_t used, int64_t readable, int64_t k, int64_t steps,
           bf16* scratch) {
    if constexpr (kSplit<T>) {
      bf16* lo = scratch + kTile * kStepK * steps;
      direct_ = scratch;
      lo_ = lo;
      stride_ = kStepK;
      full_steps_ = steps;
      for (int64_t step = 0; step < steps; ++step) {
        for (int64_t i = 0; i < kTile; ++i) {
          const __mmask32 mask = i < used ? first_of_32(k - step * kStepK) : 0;
          __m512i high, low;
          split_halves(_mm512_maskz_loadu_epi16(mask, rows + i * row_stride + step * kStepK), high, low);
          _mm512_storeu_si512(scratch + (step * kTile + i) * kStepK, high);
          _mm512_storeu_si512(lo + (step * kTile + i) * kStepK, low);
        }
      }
      step_elements_ = kTile * kStepK;
    } else if (readable >= kTile) {
      direct_ = reinterpret_cast<const bf16*>(rows);
      stride_ = row_stride;
      full_steps_ = k / kStepK;
      step_elements_ = kStepK;
      if (full_steps_ < steps) {
        tail_ = scratch;
        copy_rows(rows, row_stride, kTile, full_steps_ * kStepK, k, scratch, kStepK);
      }
    } else {
      direct_ = scratch;
      stride_ = steps * kStepK;
      full_steps_ = steps;
      step_elements_ = kStepK;
      copy_rows(rows, row_stride, used, 0, k, scratch, stride_);
    }
    compiler_barrier();
  }
  const void* at(int64_t step) const { return step < full_steps_ ? direct_ + step * step_elements_ : tail_; }
  const void* at_lo(int64_t step) const { return lo_ + step * step_elements_; }
  int64_t stride_bytes(int64_t step) const {
    return step < full_steps_ ? stride_ * static_cast<int64_t>(sizeof(bf16)) : kTileBytes;
  }

 private:
  // dst[i, :width] = rows[i, k_begin:k_end] for i < used, zero elsewhere
  static void copy_rows(const T* rows, int64_t row_stride, int64_t used, int64_t k_begin, int64_t k_end, bf16* dst,
                        int64_t width) {
    for (int64_t i = 0; i < kTile; ++i) {
      for (int64_t k = 0; k < width; k += kStepK) {
        const __mmask32 mask = i < used ? first_of_32(k_end - k_begin - k) : 0;
        _mm512_storeu_si512(dst + i * width + k, _mm512_maskz_loadu_epi16(mask, rows + i * row_stride + k_begin + k));
      }
    }
  }

  const bf16* direct_ = nullptr;
  const bf16* tail_ = nullptr;
  const bf16* lo_ = nullptr;
  int64_t stride_ = 0, full_steps_ = 0, step_elements_ = 0;
};

inline uintptr_t align64(uintptr_t p) { return (p + 63) & ~uintptr_t{63}; }
template <typename P>
P* aligned(P* p) {
  return reinterpret_cast<P*>(align64(reinterpret_cast<uintptr_t>(p)));
}

}  // namespace amx
}  // namespace cpu
}  // namespace lora_ext

#include "cpu/avx512_end.h"
#endif  // LORA_EXT_HAVE_AMX
