// Opens a region of code compiled for AVX-512 (F/BW/VL/DQ with FMA and F16C), whatever the build's
// -march; the code in it runs only after cpu_has_avx512() has found those instructions. Use:
//   #ifdef LORA_EXT_HAVE_AVX512   (from cpu/avx512_isa.h)
//   #include "cpu/avx512_begin.h"
//   ... kernels ...
//   #include "cpu/avx512_end.h"
//   #endif
// No include guard: each region includes it once.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
// GCC 12 warns about an uninitialized variable inside its own avx512fintrin.h helpers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
