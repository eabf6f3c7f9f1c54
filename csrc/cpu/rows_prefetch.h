// Software prefetch of a block of rows (a GEMM's next weight rows), spread over the steps of the
// loops that run meanwhile. linear_lora's GEMMs (base_gemm_avx512.cpp, amx_linear.cpp) compute
// one block of weight rows against every row block of x before moving on: the first pass over a
// block would wait on memory at every step, the later ones read it from cache. Each pass asks
// for its share of the next block's lines, so that the next block's first pass finds them in L1
// (benchmarks/NOTES.md: float32 fused decode 2-3 ms per forward faster in the bench model).
#pragma once

#include <xmmintrin.h>

#include <algorithm>
#include <cstdint>

namespace lora_ext {
namespace cpu {

class RowsPrefetch {
 public:
  RowsPrefetch() = default;

  // Share `part` of `parts` of the lines of `rows` rows from `first` (`row_stride` bytes apart,
  // `row_bytes` bytes each), asked for over `steps` calls of step().
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
      _mm_prefetch(row_ + offset_, _MM_HINT_T0);
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

}  // namespace cpu
}  // namespace lora_ext
