// Whether this build can compile the AVX-512 kernels (x86-64 with GCC or Clang: they are compiled
// for AVX-512 whatever -march says and run only where cpu_has_avx512() finds it), the intrinsics,
// and the mask of the first n of 16 lanes for the kernels' tails (plain integer arithmetic on the
// mask type, so it needs no AVX-512 target of its own).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define LORA_EXT_HAVE_AVX512 1
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace lora_ext {
namespace cpu {

inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << std::max<int64_t>(n, 0)) - 1u);
}

}  // namespace cpu
}  // namespace lora_ext
#endif
