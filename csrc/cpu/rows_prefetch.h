// Software prefetch of a block of rows (a GEMM's next weight rows), spread over the steps of the
// loop that runs meanwhile. linear_lora's fused GEMMs (base_gemm_avx512.cpp, amx_linear.cpp)
// compute one block of weight rows against every row block of x before moving on: the first pass
// over a block would wait on memory at every step, the later ones find it in cache. Each pass asks
// for its share of the next block's lines, so that the next block's first pass finds them in
// cache too (benchmarks/NOTES.md). __builtin_prefetch, not an x86 intrinsic: this header is
// compiled on every platform.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/base_gemm.h"

namespace lora_ext {
namespace cpu {

class RowsPrefetch {
 public:
  RowsPrefetch() = default;

  // Share `part` of `parts` (0 <= part < parts) of the lines of `rows` rows (none when rows <= 0)
  // from `first`, `row_stride` bytes apart, `row_bytes` bytes each, asked for over `steps` calls of
  // step(). A row is fetched in whole lines from its first byte.
  RowsPrefetch(const void* first, int64_t rows, int64_t row_stride, int64_t row_bytes, int64_t part, int64_t parts,
               int64_t steps) {
    const int64_t row_lines = (row_bytes + 63) / 64;
    const int64_t total = std::max<int64_t>(rows, 0) * row_lines;
    const int64_t begin = total * part / parts;
    lines_ = total * (part + 1) / parts - begin;
    row_ = static_cast<const char*>(first) + (row_lines > 0 ? begin / row_lines * row_stride : 0);
    offset_ = row_lines > 0 ? begin % row_lines * 64 : 0;
    row_stride_ = row_stride;
    row_end_ = row_lines * 64;
    per_step_ = (lines_ + std::max<int64_t>(steps, 1) - 1) / std::max<int64_t>(steps, 1);
  }

  __attribute__((always_inline)) inline void step() {
    for (int64_t i = 0; i < per_step_ && lines_ > 0; ++i, --lines_) {
      __builtin_prefetch(row_ + offset_, /*rw=*/0, /*locality=*/3);
      offset_ += 64;
      if (offset_ == row_end_) {
        offset_ = 0;
        row_ += row_stride_;
      }
    }
  }

 private:
  const char* row_ = nullptr;  // the row the next line is in
  int64_t offset_ = 0;         // the next line's offset in it
  int64_t row_stride_ = 0;
  int64_t row_end_ = 0;        // bytes fetched of each row: whole lines
  int64_t lines_ = 0;          // lines still to ask for
  int64_t per_step_ = 0;
};

// Share `pass` of `passes` (0 <= pass < passes) of g's weight rows [n_begin, n_end), clipped to
// g.n, asked for over `steps` steps: what one pass of a fused GEMM asks for of the block it
// computes next.
inline RowsPrefetch next_weight_rows(const BaseGemmArgs& g, int64_t n_begin, int64_t n_end, int64_t pass,
                                     int64_t passes, int64_t steps) {
  const int64_t elem = static_cast<int64_t>(c10::elementSize(g.dtype));
  const int64_t begin = std::min(n_begin, g.n), end = std::min(n_end, g.n);
  return RowsPrefetch(static_cast<const char*>(g.w) + begin * g.w_row_stride * elem, end - begin,
                      g.w_row_stride * elem, g.k * elem, pass, passes, steps);
}

}  // namespace cpu
}  // namespace lora_ext
