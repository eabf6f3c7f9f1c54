// Long segments' deltas on the tile unit (amx_deltas.h), bfloat16. The work is split over threads
// in units of 16 rows of one segment, each thread owning its units' output rows (no barrier). A
// thread starting on a segment first lays out its adapter for the tile unit:
//   A as right operands, 16 ranks x 32 values of k per tile: [k / 2][rank][k % 2];
//   B as right operands, 32 ranks x 16 columns per tile:     [r / 2][n][r % 2].
// Then, for each unit:
//  1. Shrink: h (16 rows x ranks, float32) = x's 16 rows (left operands, read straight from x when
//     the rows are consecutive there, else from a gathered copy) times A's tiles, then scaled.
//  2. Split: h = high + low, both bfloat16 (the high part truncated, the low part the rounded
//     remainder), as left operands of 16 rows x 32 ranks.
//  3. Expand: for each pair of 16-column blocks, (high + low) x B's tiles summed on the tile unit,
//     added to out's rows (when accumulating) and rounded once.
// Tiles, all 16 rows x 64 bytes: float32 sums in 0-1, x's rows or h's parts in 4-5, A's or B's
// tiles in 6-7.
#include "cpu/amx_deltas.h"

#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>

#include "cpu/amx_tiles.h"
#include "cpu/work.h"

#ifdef LORA_EXT_HAVE_AMX
#include "cpu/avx512_begin.h"
#pragma GCC target("avx512bf16,amx-tile,amx-bf16")

#include "cpu/avx512_lanes.h"

namespace lora_ext {
namespace cpu {
namespace {

using namespace amx;

constexpr int64_t kTileValues = kTile * kStepK;  // bfloat16 values in one 16 x 64-byte tile

// What a thread keeps for the segment it works on: the sizes and its adapter in tile layout.
struct SegmentTiles {
  const AmxSegment* seg = nullptr;
  int64_t rank_tiles = 0;  // tiles of 16 ranks in the shrink: ceil(rank / 16)
  int64_t rank_steps = 0;  // products of 32 ranks in the expand: ceil(rank / 32)
  bf16* a = nullptr;       // [rank tile][step] tiles
  bf16* b = nullptr;       // [rank step][column block] tiles

  const bf16* a_tile(int64_t tile, int64_t step, int64_t steps) const { return a + (tile * steps + step) * kTileValues; }
  const bf16* b_tile(int64_t q, int64_t block, int64_t blocks) const { return b + (q * blocks + block) * kTileValues; }
};

// A's ranks [16 tile, 16 tile + 16) as right operands, zero past the rank and past d_in.
void lay_out_a(const AmxDeltaArgs& args, const AmxSegment& seg, int64_t steps, SegmentTiles& t) {
  const bf16* a = static_cast<const bf16*>(seg.a);
  for (int64_t tile = 0; tile < t.rank_tiles; ++tile) {
    for (int64_t step = 0; step < steps; ++step) {
      const __mmask32 mask = first_of_32(args.d_in - step * kStepK);
      __m512i r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        const int64_t rank = tile * kTile + i;
        r[i] = rank < seg.rank ? _mm512_maskz_loadu_epi16(mask, a + rank * args.a_rank_stride + step * kStepK)
                               : _mm512_setzero_si512();
      }
      transpose_16x16(r);  // r[p]: the pair (k = 2p, 2p + 1) of each of the 16 ranks
      bf16* dst = t.a + (tile * steps + step) * kTileValues;
#pragma GCC unroll 16
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(dst + p * kStepK, r[p]);
    }
  }
}

// B's ranks [32 q, 32 q + 32) x columns [16 block, 16 block + 16) as right operands, zero past the
// rank and past d_out.
void lay_out_b(const AmxDeltaArgs& args, const AmxSegment& seg, int64_t col_blocks, SegmentTiles& t) {
  const bf16* b = static_cast<const bf16*>(seg.b);
  // value j of the result: element j / 2 of the even rank's row (j even) or of the odd one's
  alignas(64) static const uint16_t kInterleave[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                      8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  for (int64_t q = 0; q < t.rank_steps; ++q) {
    for (int64_t block = 0; block < col_blocks; ++block) {
      const int64_t n0 = block * kTile, cols = std::min<int64_t>(kTile, args.d_out - n0);
      bf16* dst = t.b + (q * col_blocks + block) * kTileValues;
      for (int64_t p = 0; p < kTile; ++p) {
        const int64_t r = q * kStepK + 2 * p;
        if (args.b_out_stride == 1) {
          const __mmask16 mask = first_lanes(cols);
          const __m256i even = r < seg.rank ? _mm256_maskz_loadu_epi16(mask, b + r * args.b_rank_stride + n0)
                                            : _mm256_setzero_si256();
          const __m256i odd = r + 1 < seg.rank ? _mm256_maskz_loadu_epi16(mask, b + (r + 1) * args.b_rank_stride + n0)
                                               : _mm256_setzero_si256();
          _mm512_storeu_si512(dst + p * kStepK, _mm512_permutex2var_epi16(_mm512_castsi256_si512(even), interleave,
                                                                          _mm512_castsi256_si512(odd)));
          continue;
        }
        for (int64_t n = 0; n < kTile; ++n) {
          for (int64_t e = 0; e < 2; ++e) {
            const bool inside = n < cols && r + e < seg.rank;
            dst[p * kStepK + 2 * n + e] = inside ? b[(n0 + n) * args.b_out_stride + (r + e) * args.b_rank_stride] : bf16(0.f);
          }
        }
      }
    }
  }
}

// Room each thread needs, in bfloat16 values, for one segment of rank R at most.
struct Scratch {
  bf16* a;       // A's tiles
  bf16* b;       // B's tiles
  bf16* rows;    // x's rows gathered, or a partial step's copy (RowTiles)
  bf16* gather;  // x's 16 rows when not consecutive in x
  float* h;      // 16 rows x rank_steps * 32
  bf16* parts;   // [rank step][high, low] tiles of h
};

class Units {
 public:
  explicit Units(const AmxDeltaArgs& args) {
    first_unit_.push_back(0);
    for (const AmxSegment& seg : args.segments) first_unit_.push_back(first_unit_.back() + (seg.count + kTile - 1) / kTile);
  }
  int64_t count() const { return first_unit_.back(); }
  // (segment, block of 16 rows in it) of unit u
  std::pair<int64_t, int64_t> at(int64_t u) const {
    const int64_t s = std::upper_bound(first_unit_.begin(), first_unit_.end(), u) - first_unit_.begin() - 1;
    return {s, u - first_unit_[s]};
  }

 private:
  std::vector<int64_t> first_unit_;
};

// Steps 1-3 for rows order[row0 .. row0 + used) of the segment in t.
void unit_deltas(const AmxDeltaArgs& args, const SegmentTiles& t, int64_t row0, int64_t used, int64_t steps,
                 int64_t col_blocks, const Scratch& sc) {
  const AmxSegment& seg = *t.seg;
  const bf16* x = static_cast<const bf16*>(args.x);
  const int32_t* order = args.order + row0;
  bool consecutive = true;
  for (int64_t i = 1; i < used; ++i) consecutive = consecutive && order[i] == order[0] + i;
  const bf16* rows = x + order[0] * args.x_row_stride;
  int64_t row_stride = args.x_row_stride, readable = args.x_rows - order[0];
  if (!consecutive) {  // gather the rows: then they are 16 consecutive ones of a zero-padded copy
    for (int64_t i = 0; i < kTile; ++i) {
      for (int64_t step = 0; step < steps; ++step) {
        const __m512i values = i < used ? _mm512_maskz_loadu_epi16(first_of_32(args.d_in - step * kStepK),
                                                                   x + order[i] * args.x_row_stride + step * kStepK)
                                        : _mm512_setzero_si512();
        _mm512_storeu_si512(sc.gather + i * steps * kStepK + step * kStepK, values);
      }
    }
    rows = sc.gather;
    row_stride = steps * kStepK;
    readable = kTile;
  }
  const RowTiles<bf16> left(rows, row_stride, used, readable, consecutive ? args.d_in : steps * kStepK, steps, sc.rows);

  // 1. h = x A^T, 32 ranks (two tiles) per pass over k
  const int64_t h_stride = t.rank_steps * kStepK;
  for (int64_t tile = 0; tile < t.rank_tiles; tile += 2) {
    const bool two = tile + 1 < t.rank_tiles;
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t step = 0; step < steps; ++step) {
      _tile_loadd(4, left.at(step), left.stride_bytes(step));
      _tile_loadd(6, t.a_tile(tile, step, steps), kTileBytes);
      _tile_dpbf16ps(0, 4, 6);
      if (two) {
        _tile_loadd(7, t.a_tile(tile + 1, step, steps), kTileBytes);
        _tile_dpbf16ps(1, 4, 7);
      }
    }
    _tile_stored(0, sc.h + tile * kTile, h_stride * sizeof(float));
    if (two) _tile_stored(1, sc.h + (tile + 1) * kTile, h_stride * sizeof(float));
  }
  compiler_barrier();

  // 2. scale * h as high and low bfloat16 parts; ranks past the last tile of 16 are zero
  const __m512 scale = _mm512_set1_ps(seg.scale);
  const __m512i high_bits = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t q = 0; q < t.rank_steps; ++q) {
    const bool second = 2 * q + 1 < t.rank_tiles;
    bf16* high = sc.parts + 2 * q * kTileValues;
    bf16* low = high + kTileValues;
    for (int64_t i = 0; i < kTile; ++i) {
      const float* h = sc.h + i * h_stride + q * kStepK;
      const __m512 v0 = _mm512_mul_ps(scale, _mm512_load_ps(h));
      const __m512 v1 = second ? _mm512_mul_ps(scale, _mm512_load_ps(h + kTile)) : _mm512_setzero_ps();
      const __m512 h0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v0), high_bits));
      const __m512 h1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v1), high_bits));
      // both exact for the high parts (already bfloat16 values); the low parts rounded. An h of
      // +-inf gives a NaN low part (inf - inf), so such a row's output is NaN, not +-inf.
      _mm512_storeu_si512(high + i * kStepK, (__m512i)_mm512_cvtne2ps_pbh(h1, h0));
      _mm512_storeu_si512(low + i * kStepK,
                          (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(v1, h1), _mm512_sub_ps(v0, h0)));
    }
  }
  compiler_barrier();

  // 3. out (+)= (high + low) B^T, two column blocks at a time
  bf16* out = static_cast<bf16*>(args.out);
  for (int64_t block = 0; block < col_blocks; block += 2) {
    const bool two = block + 1 < col_blocks;
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t q = 0; q < t.rank_steps; ++q) {
      _tile_loadd(4, sc.parts + 2 * q * kTileValues, kTileBytes);
      _tile_loadd(5, sc.parts + (2 * q + 1) * kTileValues, kTileBytes);
      _tile_loadd(6, t.b_tile(q, block, col_blocks), kTileBytes);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(0, 5, 6);
      if (two) {
        _tile_loadd(7, t.b_tile(q, block + 1, col_blocks), kTileBytes);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(1, 5, 7);
      }
    }
    alignas(64) float sums[2][kTile][kTile];
    compiler_barrier();  // the last block's plain loads of sums stay before these stores
    _tile_stored(0, sums[0], kTileBytes);
    _tile_stored(1, sums[1], kTileBytes);
    compiler_barrier();
    for (int half = 0; half < (two ? 2 : 1); ++half) {
      const int64_t n0 = (block + half) * kTile;
      const __mmask16 mask = first_lanes(args.d_out - n0);
      for (int64_t i = 0; i < used; ++i) {
        bf16* o = out + order[i] * args.out_row_stride + n0;
        __m512 v = _mm512_load_ps(sums[half][i]);
        if (args.accumulate) v = _mm512_add_ps(v, avx512::load_16_lanes(o, mask));
        _mm256_mask_storeu_epi16(o, mask, (__m256i)_mm512_cvtneps_pbh(v));  // round to nearest even
      }
    }
  }
}

}  // namespace

void amx_segment_deltas(const AmxDeltaArgs& args) {
  const Units units(args);
  const int64_t steps = (args.d_in + kStepK - 1) / kStepK, col_blocks = (args.d_out + kTile - 1) / kTile;
  int64_t max_rank = 0;
  for (const AmxSegment& seg : args.segments) max_rank = std::max(max_rank, seg.rank);
  const int64_t rank_tiles = (max_rank + kTile - 1) / kTile, rank_steps = (max_rank + kStepK - 1) / kStepK;
  // bfloat16 values of each part of a thread's scratch, each rounded up to whole tiles
  const int64_t a_size = rank_tiles * steps * kTileValues, b_size = rank_steps * col_blocks * kTileValues;
  const int64_t rows_size = RowTiles<bf16>::scratch_size(steps), parts_size = 2 * rank_steps * kTileValues;
  const int64_t h_size = 2 * kTile * rank_steps * kStepK;  // 16 x rank_steps * 32 floats
  const int64_t total = a_size + b_size + 2 * rows_size + h_size + parts_size;
  const int64_t threads = at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), units.count());
#pragma omp parallel num_threads(threads)
  {
    const int64_t team = omp_get_num_threads(), t = omp_get_thread_num();
    thread_local ReusedBuffer buffer;
    bf16* base = aligned(reinterpret_cast<bf16*>(buffer.get(total / 2 + 16)));
    const Scratch sc{base, base + a_size, base + a_size + b_size, base + a_size + b_size + rows_size,
                     reinterpret_cast<float*>(base + a_size + b_size + 2 * rows_size),
                     base + a_size + b_size + 2 * rows_size + h_size};
    configure_tiles();
    SegmentTiles tiles;
    for (int64_t u = units.count() * t / team; u < units.count() * (t + 1) / team; ++u) {
      const auto [s, block] = units.at(u);
      const AmxSegment& seg = args.segments[s];
      if (tiles.seg != &seg) {
        tiles = SegmentTiles{&seg, (seg.rank + kTile - 1) / kTile, (seg.rank + kStepK - 1) / kStepK, sc.a, sc.b};
        lay_out_a(args, seg, steps, tiles);
        lay_out_b(args, seg, col_blocks, tiles);
        compiler_barrier();
      }
      const int64_t row0 = seg.first + block * kTile;
      unit_deltas(args, tiles, row0, std::min<int64_t>(kTile, seg.first + seg.count - row0), steps, col_blocks, sc);
    }
    _tile_release();
  }
}

}  // namespace cpu
}  // namespace lora_ext

#include "cpu/avx512_end.h"
#else
namespace lora_ext {
namespace cpu {
void amx_segment_deltas(const AmxDeltaArgs&) {}
}  // namespace cpu
}  // namespace lora_ext
#endif  // LORA_EXT_HAVE_AMX
