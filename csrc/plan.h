// The batch plan: rows grouped by adapter slot, computed once per forward pass and shared by
// every layer. One int32 tensor, laid out as below, built by lora_ext::build_plan on the device
// of slot_ids; the kernels of that device read it without any host synchronization.
//
//   [0]                 number of rows T
//   [1]                 number of slots S
//   offsets[NB + 1]     rows of bin b are order[offsets[b] : offsets[b + 1]]
//   decode_tiles[NB+1]  exclusive prefix sum of ceil(count[b] / kDecodeTileRows)
//   prefill_tiles[NB+1] exclusive prefix sum of ceil(count[b] / kPrefillTileRows)
//   order[T]            row indices sorted by bin, ascending within a bin (stable)
//
// Bins: 0..S-1 are slots, S holds rows with slot -1 (no adapter), S+1 rows whose slot id is out
// of range (only possible on CUDA, where ids are not checked on the host; those rows get NaN).
// Python reads this layout through the plan_layout op; no other file restates it.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef __CUDACC__
#define LORA_HOST_DEVICE __host__ __device__
#else
#define LORA_HOST_DEVICE
#endif

namespace lora_ext {

constexpr int64_t kDecodeTileRows = 4;
constexpr int64_t kPrefillTileRows = 64;

struct PlanLayout {
  int64_t num_rows;
  int64_t num_slots;

  LORA_HOST_DEVICE int64_t num_bins() const { return num_slots + 2; }
  LORA_HOST_DEVICE int64_t no_adapter_bin() const { return num_slots; }
  LORA_HOST_DEVICE int64_t invalid_bin() const { return num_slots + 1; }
  LORA_HOST_DEVICE int64_t offsets() const { return 2; }
  LORA_HOST_DEVICE int64_t decode_tiles() const { return offsets() + num_bins() + 1; }
  LORA_HOST_DEVICE int64_t prefill_tiles() const { return decode_tiles() + num_bins() + 1; }
  LORA_HOST_DEVICE int64_t order() const { return prefill_tiles() + num_bins() + 1; }
  LORA_HOST_DEVICE int64_t size() const { return order() + num_rows; }
};

// An upper bound of sum over bins of ceil(count / tile_rows), known on the host from shapes only:
// it sizes the kernel grids so that launches never depend on data.
inline int64_t max_tiles(int64_t num_rows, int64_t num_bins, int64_t tile_rows) {
  return num_rows / tile_rows + std::min(num_bins, num_rows);
}

}  // namespace lora_ext
