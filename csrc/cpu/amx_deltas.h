// The deltas of long segments (many rows of one adapter: prefill, equal-length prompts) on the
// tile unit, for bfloat16 on CPUs with AMX (amx_deltas.cpp). Without it those segments ran as two
// oneDNN GEMMs each, the second a thin one (k = rank) that reads and writes the whole output: about
// 100 us and 200 us a layer of the bench model at 512 rows, for work the tile unit does in a
// fraction of that (benchmarks/NOTES.md).
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/amx_linear.h"

namespace lora_ext {
namespace cpu {

struct AmxDeltaArgs {
  const void* x;       // (rows, d_in) bfloat16, unit stride along d_in
  int64_t x_row_stride, x_rows;
  void* out;           // (rows, d_out) bfloat16, unit stride along d_out
  int64_t out_row_stride;
  const int32_t* order;  // the plan's order
  int64_t d_in, d_out;
  int64_t a_rank_stride, b_out_stride, b_rank_stride;
  bool accumulate;     // out += delta, else out = delta
  std::vector<AmxSegment> segments;  // bfloat16 A and B
};

// out[row] (+)= scale * (x[row] A[:rank]^T) B[:, :rank]^T for every row of every segment: x A^T
// as float32 sums, kept as two bfloat16 parts (high and low) for the tile products with B, so the
// delta is as exact as float32 products of h and B; each output rounded once. Call only where
// amx_path_on() (amx_linear.h).
void amx_segment_deltas(const AmxDeltaArgs& args);

}  // namespace cpu
}  // namespace lora_ext
