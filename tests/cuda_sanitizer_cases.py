"""Small runs of every CUDA kernel path, for compute-sanitizer (memcheck, racecheck):
    compute-sanitizer --tool memcheck python tests/cuda_sanitizer_cases.py
Each case is also checked against the reference, so a silent wrong answer fails here too."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import lora_ext  # noqa: E402
from helpers import check_add_lora, check_lora_delta, make_inputs  # noqa: E402

CASES = [
    # (path, dtype, rows, d_in, d_out, slots, R, distribution, b_layout, x_layout)
    ("simt", torch.bfloat16, 13, 256, 72, 4, 16, "with_none", "peft", "contiguous"),
    ("simt", torch.float16, 13, 256, 72, 4, 16, "unsorted", "rank_major", "contiguous"),
    ("simt", torch.float32, 9, 67, 33, 3, 5, "with_none", "peft", "strided"),
    ("simt", torch.float32, 9, 64, 96, 3, 8, "distinct", "rank_major", "contiguous"),
    ("mma", torch.bfloat16, 150, 136, 200, 3, 72, "with_none", "peft", "contiguous"),
    ("mma", torch.float16, 130, 64, 130, 2, 16, "sorted", "rank_major", "contiguous"),
]


def main():
    for path, dtype, rows, d_in, d_out, slots, max_rank, dist, b_layout, x_layout in CASES:
        lora_ext.kernel_config.configure(cuda_kernel=path)
        inputs = make_inputs(rows, d_in, d_out, slots, max_rank, dtype, "cuda", dist, b_layout=b_layout,
                             x_layout=x_layout)
        check_lora_delta(lora_ext.lora_delta(**inputs), inputs, what=path)
        out = torch.zeros(rows, d_out, device="cuda", dtype=dtype)
        before = out.clone()
        lora_ext.add_lora_(out, **inputs)
        check_add_lora(out, before, inputs, what=path)
    # The backward (dx, dA, dB), decode- and prefill-shaped, each checked against the reference.
    from grad_helpers import check_grads  # noqa: E402

    lora_ext.kernel_config.configure(cuda_kernel="auto")
    for rows, slots, dist in ((9, 8, "distinct"), (150, 3, "with_none")):
        for dtype in (torch.float32, torch.bfloat16):
            check_grads("lora_delta", make_inputs(rows, 136, 72, slots, 16, dtype, "cuda", dist, b_layout="rank_major"),
                        f"cuda backward {dtype} T={rows}")
    # The plan with a cursor too large for shared memory, and out-of-range ids (NaN rows).
    ids = torch.randint(-1, 9000, (3000,), device="cuda")
    assert torch.equal(lora_ext.build_plan(ids, 9000).cpu(), lora_ext.build_plan(ids.cpu(), 9000))
    inputs = make_inputs(8, 64, 64, 2, 8, torch.bfloat16, "cuda", "unsorted")
    inputs["slot_ids"][0] = 5
    assert torch.isnan(lora_ext.lora_delta(**inputs)[0]).all()
    torch.cuda.synchronize()
    print("sanitizer cases done")


if __name__ == "__main__":
    main()
