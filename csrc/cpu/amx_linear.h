// linear_lora for bfloat16 and float16 on CPUs with AMX: the base GEMM on the tile unit, fused with
// each row's LoRA delta in one parallel region (amx_linear.cpp). Where the CPU has AMX, the
// library's GEMM (oneDNN) runs bfloat16 on it about 4x faster than lora_ext's AVX-512 GEMM, so the
// AVX-512 fusion loses there; this path keeps the tile unit's rate and still adds the deltas before
// each output is rounded. float16 runs as exact pairs of bfloat16 parts (three tile products per
// step), 1.2-2.4x faster at decode sizes than ATen's float16 GEMM (benchmarks/NOTES.md).
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/base_gemm.h"
#include "cpu/item_kernels.h"

namespace lora_ext {
namespace cpu {

// The rows of one slot with an adapter of rank > 0: rows order[first .. first + count).
struct AmxSegment {
  int64_t first, count, rank;
  float scale;
  const void* a;  // A[slot] in x's dtype: a[r * a_rank_stride + k], unit stride along d_in
  const void* b;  // B[slot]: b[n * b_out_stride + r * b_rank_stride]
};

struct AmxLoraArgs {
  const int32_t* order;               // every row of x once, grouped by slot (the plan's order)
  std::vector<AmxSegment> segments;   // ascending `first`; rows in none get the base layer only
  int64_t max_rank;                   // R: rows of A that exist per slot
  int64_t a_rank_stride, b_out_stride, b_rank_stride;
  // Where set (float16), segments of at most kAmxItemShrinkRows rows shrink on this AVX-512 item
  // kernel instead, items[i] being segment i's arguments: splitting A into bfloat16 parts costs
  // more than a few rows' products.
  void (*item_shrink)(const ItemArgs&, const float*, int64_t, int64_t, float*) = nullptr;
  std::vector<ItemArgs> items;
};

constexpr int64_t kAmxItemShrinkRows = 4;

// Whether this CPU has AMX-BF16 and the OS lets this process use the tiles (Linux grants them
// on request, once per process).
bool amx_bf16_usable();
// Whether the AMX kernels run: the CPU and OS allow them and the cpu_amx setting is on.
bool amx_path_on();

// out = x W^T + bias + each row's delta, for a bfloat16 or float16 `gemm` (x, W, bias and out with
// unit stride along their last dimension). Float32 sums; each output rounded once.
void amx_linear_lora(const BaseGemmArgs& gemm, const AmxLoraArgs& lora);

}  // namespace cpu
}  // namespace lora_ext
