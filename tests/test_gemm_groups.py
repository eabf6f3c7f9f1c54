"""Slots with many rows of equal count and rank run as batched GEMMs (csrc/cpu/gemm_groups.h):
forward and gradients of every op against the reference under the rule of tolerances.py, with
the rows in one run or scattered, the slots consecutive or not, groups of different ranks next to
a slot left over and base rows; and the batched path really ran."""

import math

import pytest
import torch

from grad_helpers import check_grads
from helpers import check_add_lora, check_lora_delta
from lora_ext import kernel_config, ops
from test_gradients import base_layer

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# cpu_amx off: on AMX hosts bfloat16 segments run on the tile unit instead (test_amx_deltas.py)
GEMM_FROM_8_ROWS = dict(cpu_gemm_min_rows=8, cpu_backward_gemm_min_rows=8, cpu_amx=False)

# name -> (each row's slot before shuffling, each slot's rank), 6 slots of up to rank 16
LAYOUTS = {
    # slots 0-3, 12 rows each, rank 16: a training batch (one run of rows, consecutive slots)
    "one_group": ([0] * 12 + [1] * 12 + [2] * 12 + [3] * 12, [16, 16, 16, 16, 16, 16]),
    # slots 1, 3, 4 (rank 5) and 0, 2 (rank 1) in two groups, slot 5 alone (9 rows), base rows
    "two_groups": ([1] * 10 + [3] * 10 + [4] * 10 + [0] * 9 + [2] * 9 + [5] * 11 + [-1] * 7, [1, 5, 1, 5, 5, 16]),
    # one run of rows per slot, but not in slot order (gathered, not viewed)
    "runs_out_of_order": ([3] * 12 + [0] * 12 + [2] * 12 + [1] * 12, [16, 16, 16, 16, 16, 16]),
}


def inputs_for(layout, dtype, shuffled, d_in=67, d_out=130, seed=0, b_layout="rank_major", x_layout="contiguous"):
    """Op inputs with the layout's slots and ranks; NaN beyond each slot's rank (never read);
    lora_b as a view of rank-major storage (the model's) or contiguous (S, d_out, R) (PEFT's)."""
    slots_of_rows, ranks = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(slots_of_rows)
    if shuffled:
        ids = ids[torch.randperm(len(ids), generator=g)]
    slots, max_rank = len(ranks), 16
    lora_a = torch.randn(slots, max_rank, d_in, generator=g) / math.sqrt(d_in)
    lora_b = torch.randn(slots, max_rank, d_out, generator=g) / math.sqrt(max_rank)  # rank-major storage
    for slot, rank in enumerate(ranks):
        lora_a[slot, rank:] = float("nan")
        lora_b[slot, rank:] = float("nan")
    lora_b = lora_b.to(dtype).transpose(1, 2)
    x = torch.randn(len(ids), d_in, generator=g).to(dtype)
    x = x.t().contiguous().t() if x_layout == "transposed" else x
    return dict(x=x, lora_a=lora_a.to(dtype),
                lora_b=lora_b.contiguous() if b_layout == "peft" else lora_b, slot_ids=ids,
                scales=torch.rand(slots, generator=g) * 2 + 0.1, ranks=torch.tensor(ranks, dtype=torch.int32))


def args(inputs):
    return [inputs[k] for k in ("x", "lora_a", "lora_b", "slot_ids", "scales", "ranks")]


@pytest.mark.parametrize("x_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("b_layout", ["rank_major", "peft"])
@pytest.mark.parametrize("shuffled", [False, True], ids=["rows_in_runs", "rows_scattered"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_forward_of_batched_groups(dtype, layout, shuffled, b_layout, x_layout):
    inputs = inputs_for(layout, dtype, shuffled, b_layout=b_layout, x_layout=x_layout)
    with kernel_config.configured(**GEMM_FROM_8_ROWS), kernel_config.paths_taken() as taken:
        delta = ops.lora_delta(*args(inputs))
        before = torch.randn(delta.shape).to(dtype)
        out = before.t().contiguous().t() if x_layout == "transposed" else before.clone()  # a strided out too
        ops.add_lora_(out, *args(inputs))
    assert taken.get("cpu_gemm_batched", 0) == 2, taken
    check_lora_delta(delta, inputs, f"lora_delta {layout}")
    check_add_lora(out, before, inputs, f"add_lora_ {layout}")


@pytest.mark.parametrize("b_layout", ["rank_major", "peft"])
@pytest.mark.parametrize("op", ["lora_delta", "add_lora_", "linear_lora"])
@pytest.mark.parametrize("shuffled", [False, True], ids=["rows_in_runs", "rows_scattered"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_gradients_of_batched_groups(dtype, layout, shuffled, op, b_layout):
    inputs = inputs_for(layout, dtype, shuffled, b_layout=b_layout)
    weight, bias = base_layer(67, 130, dtype)
    with kernel_config.configured(**GEMM_FROM_8_ROWS, cpu_fused_linear=False), \
            kernel_config.paths_taken() as taken:
        check_grads(op, inputs, f"{op} {layout}", weight=weight, bias=bias)
    assert taken.get("cpu_gemm_batched", 0) == 2, taken  # the forward's and the backward's


def test_unequal_counts_or_ranks_are_not_batched():
    inputs = inputs_for("two_groups", torch.float32, shuffled=True)
    inputs["ranks"] = torch.tensor([1, 5, 2, 6, 7, 16], dtype=torch.int32)  # every rank different
    inputs["lora_a"] = torch.nan_to_num(inputs["lora_a"])
    inputs["lora_b"] = torch.nan_to_num(inputs["lora_b"])
    with kernel_config.configured(**GEMM_FROM_8_ROWS), kernel_config.paths_taken() as taken:
        delta = ops.lora_delta(*args(inputs))
    assert "cpu_gemm_segments" in taken and "cpu_gemm_batched" not in taken, taken
    check_lora_delta(delta, inputs, "lora_delta, one slot per GEMM")


def test_a_nan_row_stays_in_its_slot():
    """Batched GEMMs keep slots apart: a NaN in one slot's row reaches only that row's output and
    that slot's weight gradients."""
    inputs = inputs_for("one_group", torch.float32, shuffled=False)
    x = inputs["x"].clone()
    x[5] = float("nan")  # a row of slot 0
    x.requires_grad_()
    a = inputs["lora_a"].clone().requires_grad_()
    b = inputs["lora_b"].clone().requires_grad_()
    with kernel_config.configured(**GEMM_FROM_8_ROWS):
        out = ops.lora_delta(x, a, b, inputs["slot_ids"], inputs["scales"], inputs["ranks"])
        out.backward(torch.ones_like(out))
    bad_rows = out.isnan().any(1).nonzero().flatten().tolist()
    assert bad_rows == [5], f"output rows with NaN: {bad_rows}"
    assert not x.grad.isnan().any(), "dx does not depend on x; no row of it may be NaN"
    for name, grad in (("dA", a.grad), ("dB", b.grad)):
        assert grad[0].isnan().any() and not grad[1:4].isnan().any(), f"{name}: NaN beyond slot 0"
