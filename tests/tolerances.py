"""Tolerances of every op test, in one place (applied by helpers.assert_rows_match).

What is compared. For each output row t, three float64 rows computed on CPU from the op's inputs:
  ref_t  the exact answer: lora_ext.reference in float64 (add_lora_: the old `out` plus the delta;
         linear_lora: x @ W^T + bias plus the delta);
  pt_t   the same math done by plain PyTorch in the inputs' dtype (helpers.pytorch_delta and
         pytorch_linear_lora): x @ A^T rounded to the dtype, @ B^T rounded, times the scale
         rounded; add_lora_ adds that to the old `out` in the dtype, linear_lora to F.linear in
         the dtype;
  mag_t  ref_t computed on absolute values (|scale| |B| |A| |x|, plus |old out|, or plus
         |x| |W|^T + |bias|).
With 2-norms over the row's d_out values, u the dtype's unit roundoff (2^-24, 2^-11, 2^-8), the
kernel's row out_t passes when

  ||out_t - ref_t|| <= min(PYTORCH_ERROR_FACTOR * pt_err_t + FLOOR[dtype] * ||ref_t||
                               + ACCUMULATION_FLOOR * 2^-24 * ||mag_t||,
                           ROW_RTOL[dtype] * ||mag_t||),
  pt_err_t = ||pt_t - ref_t||, or for the gradient checks (tests/grad_helpers.py)
  pt_err_t = max(||pt_t - ref_t||, ||mag_t|| * the largest ||pt_s - ref_s|| / ||mag_s|| over the rows s of t's slot).

Rows that must be exact (no adapter or rank 0: zero, or the old `out` unchanged) are compared for
equality; NaN and infinity never pass.

Why twice PyTorch (flash-attention's rule): the error is measured against the result, and PyTorch
in the same dtype shows what rounding in that dtype costs on these very inputs. A correct kernel
rounds differently (float32 accumulation, the output rounded once, the rank-r intermediate perhaps
rounded to the dtype as PyTorch does), so its error is another sample of about the same size;
twice leaves room for that and little for a wrong answer: a delta 5% small, one rank dropped or one
row's delta dropped fails in every dtype, 4097 wide too (tests/test_tolerances.py).

Why the slot-pooled term in the gradient checks: one row's PyTorch error is one sample of rounding.
Where each row is one number that cancels (d_in = 1: a dx row is dy_t W plus the LoRA part, or
sum_j a_j v_j with v rounded to the dtype on the GEMM path, as PyTorch rounds it), a correct kernel's
row errors and PyTorch's have the same spread (measured: median 0.0069 vs 0.0077 of the result, max
0.029 vs 0.029, float16, 1037 rows), so "twice PyTorch's error on this very row" fails 8% of correct
rows. Rows of one slot are computed the same way (same A, B, scale, rank); the worst PyTorch error
per unit of magnitude among them is what rounding can cost such a row. It cannot hide a wrong answer
where rows do not cancel: there pt/mag is concentrated, and at d_in = 4097 (||mag_t|| about
100 ||ref_t||) it stays about u ||ref_t||. The op checks keep the row's own sample (they pass with it).

Why FLOOR: where a row is one or a few numbers (d_out = 1, a rank-1 adapter), PyTorch's roundings
can cancel by chance and leave ||pt_t - ref_t|| near zero while a correct kernel still rounds;
FLOOR[dtype] * ||ref_t|| is a few u of the result.

Why ACCUMULATION_FLOOR: every kernel accumulates in float32, and a float32 sum's error is bounded
relative to sum |a_i b_i| (mag_t), not to the result. Where the result cancels (a rank-1 adapter
whose x . a is near zero) that error is huge relative to ||ref_t||, PyTorch's own error is a coin
toss, and no floor relative to the result is both small and safe (one float32 row needed 20820 u
of its result). Four float32 unit roundoffs of ||mag_t|| cover it; elsewhere the term is small
(at d_in = 4097, ||mag_t|| is about 100 ||ref_t||: 2.4e-5 of the result).

Why the ROW_RTOL cap: ROW_RTOL * ||mag_t|| is the rule these tests had before (335, 5.1 and 5.1 u
of the magnitude). Where a row does not cancel (||mag_t|| close to ||ref_t||: d_in = 1, add_lora_
rows dominated by the old `out`) it is tighter than the sum above in float16 and bfloat16, so
keeping it as a cap means no check got looser; where the row cancels (d_in = 4097: ||mag_t|| about
100 ||ref_t||) the sum decides. Every check of the suite (ops, gradients, properties, compiled
layers, CUDA graphs, the sanitizer cases) applies this one rule.

How the constants were chosen: every CPU check of test_ops.py and test_linear_lora.py (all five
CPU kernel configurations: 1.9k tests, 2750 checks, 420k nonzero rows; the CPU kernels of commits
f9de9bc and af988c6, which gave identical numbers, on an AVX-512 CPU with AVX512-BF16) recorded
err_t = ||out_t - ref_t||, pt_err_t, ||ref_t|| and ||mag_t||.
  float32:  err_t <= 2.80 * 2^-24 * ||mag_t|| everywhere (PyTorch's own pt_err_t reaches 2.69), so
            with ACCUMULATION_FLOOR = 4 no row needs any floor; FLOOR = 2 u = 1.2e-7.
  float16:  the worst (err_t - 2 pt_err_t) / ||ref_t|| is 3.52 u (add_lora_, d_in = d_out = 1, a
            row where the old `out` and the delta cancel); FLOOR = 6 u = 2.9e-3.
  bfloat16: worst 4.82 u (the same kind of row); FLOOR = 6 u = 2.3e-2.
The CUDA kernels were not measured (no GPU at the time); pt_t is computed on CPU for them too.
"""

import torch

PYTORCH_ERROR_FACTOR = 2

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
FLOAT32_UNIT_ROUNDOFF = UNIT_ROUNDOFF[torch.float32]

FLOOR = {
    torch.float32: 2 * UNIT_ROUNDOFF[torch.float32],
    torch.float16: 6 * UNIT_ROUNDOFF[torch.float16],
    torch.bfloat16: 6 * UNIT_ROUNDOFF[torch.bfloat16],
}

ACCUMULATION_FLOOR = 4  # float32 unit roundoffs of ||mag_t||

ROW_RTOL = {
    torch.float32: 2e-5,
    torch.float16: 2.5e-3,
    torch.bfloat16: 2e-2,
}
