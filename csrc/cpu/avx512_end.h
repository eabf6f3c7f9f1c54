// Closes the region that cpu/avx512_begin.h opened. No include guard: each region includes it once.
#pragma GCC diagnostic pop
#pragma GCC pop_options
