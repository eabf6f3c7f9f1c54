"""Tolerances of every op test, in one place.

Results are compared with the float64 reference row by row: ||out_t - ref_t|| / ||mag_t|| must
stay under the dtype's bound, where mag is the reference computed on absolute values (|B| |A| |x|,
plus |out| for add_lora_): the scale that float rounding errors of sums grow with. The bounds are about twice what rounding alone costs: the output is
rounded once to its dtype (unit roundoff 2^-24, 2^-11, 2^-8) and the tensor-core path also rounds
the rank-r intermediate to the input dtype, as a PyTorch matmul chain in that dtype would.
A row that should be exactly zero (no adapter, rank 0) must be exactly zero; NaN never passes.
"""

import torch

ROW_RTOL = {
    torch.float32: 2e-5,
    torch.float16: 2.5e-3,
    torch.bfloat16: 2e-2,
}
