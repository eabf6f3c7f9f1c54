"""Every op against the float64 reference over dtypes, row counts, sizes, distributions,
mixed ranks with NaN beyond each rank, memory layouts, and (on CUDA) both kernel paths."""

import pytest
import torch

import lora_ext
from lora_ext import kernel_config
from helpers import DISTRIBUTIONS, check_add_lora, check_lora_delta, delta_yardsticks, make_inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROWS = [0, 1, 7, 64, 1037]
SIZES = [(1, 1), (3, 64), (64, 3), (4097, 64), (64, 4097), (128, 32000)]
CUDA_PATHS = ["auto", "simt", "mma"]


def slots_for(distribution, rows):
    return min(max(rows, 1), 64) if distribution == "distinct" else 5


def run_both_ops(inputs, dtype, label):
    """lora_delta and add_lora_ on the same inputs, each checked against the reference under the
    rule of tolerances.py."""
    yardsticks = delta_yardsticks(inputs)
    delta = lora_ext.lora_delta(**inputs)
    assert delta.dtype == dtype and delta.device == inputs["x"].device
    check_lora_delta(delta, inputs, what=f"lora_delta {label}", yardsticks=yardsticks)

    shape = (inputs["x"].shape[0], inputs["lora_b"].shape[1])
    out = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(inputs["x"].device, dtype)
    before = out.clone()
    lora_ext.add_lora_(out, **inputs)
    check_add_lora(out, before, inputs, what=f"add_lora_ {label}", yardsticks=yardsticks)


def cpu_cases():
    for dtype in DTYPES:
        for rows in ROWS:
            for d_in, d_out in SIZES:
                if rows * d_out > 4_000_000 and dtype != torch.bfloat16:
                    continue  # the widest output at 1037 rows runs once, in bfloat16
                for distribution in DISTRIBUTIONS:
                    yield pytest.param(dtype, rows, d_in, d_out, distribution,
                                       id=f"{str(dtype)[6:]}-T{rows}-{d_in}x{d_out}-{distribution}")


@pytest.mark.parametrize("dtype,rows,d_in,d_out,distribution", list(cpu_cases()))
def test_matches_reference_cpu(dtype, rows, d_in, d_out, distribution):
    inputs = make_inputs(rows, d_in, d_out, slots_for(distribution, rows), 16, dtype, "cpu",
                         distribution, seed=rows + d_in + d_out)
    run_both_ops(inputs, dtype, f"T={rows} {d_in}->{d_out} {distribution}")


def config_cases():
    for dtype in DTYPES:
        for rows, d_in, d_out in [(1, 4096, 4096), (7, 3, 64), (64, 67, 130), (300, 1, 17), (1037, 64, 4097)]:
            for distribution in ("unsorted", "with_none", "one_slot", "distinct", "sorted"):
                yield pytest.param(dtype, rows, d_in, d_out, distribution,
                                   id=f"{str(dtype)[6:]}-T{rows}-{d_in}x{d_out}-{distribution}")


@pytest.mark.parametrize("dtype,rows,d_in,d_out,distribution", list(config_cases()))
def test_every_cpu_kernel_config(cpu_config, dtype, rows, d_in, d_out, distribution):
    inputs = make_inputs(rows, d_in, d_out, slots_for(distribution, rows), 16, dtype, "cpu", distribution,
                         seed=rows * 3 + d_out)
    run_both_ops(inputs, dtype, f"{cpu_config} T={rows} {d_in}->{d_out} {distribution}")


@pytest.mark.parametrize("max_rank", [1, 5, 17, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ranks_up_to_max_cpu(cpu_config, dtype, max_rank):
    inputs = make_inputs(50, 96, 200, 7, max_rank, dtype, "cpu", "unsorted", seed=max_rank)
    run_both_ops(inputs, dtype, f"R={max_rank}")


@pytest.mark.parametrize("b_layout", ["peft", "rank_major"])
@pytest.mark.parametrize("x_layout", ["contiguous", "strided", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_memory_layouts_cpu(cpu_config, dtype, x_layout, b_layout):
    inputs = make_inputs(133, 72, 136, 4, 16, dtype, "cpu", "with_none", seed=3, b_layout=b_layout,
                         x_layout=x_layout)
    run_both_ops(inputs, dtype, f"{cpu_config} x {x_layout}, b {b_layout}")


# Decode batches (one row per adapter, rank-major B) run four items at a time on AVX-512, grouped
# by rank: equal and mixed ranks, outputs wider than the kernel's 1024-column buffer, odd sizes.
@pytest.mark.parametrize("mixed_ranks", [False, True])
@pytest.mark.parametrize("d_in,d_out", [(17, 13), (768, 256), (100, 1500), (4097, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_items_four_at_a_time(cpu_config, dtype, d_in, d_out, mixed_ranks):
    inputs = make_inputs(40, d_in, d_out, 48, 16, dtype, "cpu", "distinct", seed=d_in + d_out,
                         mixed_ranks=mixed_ranks, b_layout="rank_major")
    run_both_ops(inputs, dtype, f"{cpu_config} decode {d_in}->{d_out} mixed ranks {mixed_ranks}")
    if cpu_config == "gemm_always":
        return  # no items run; ATen's GEMM sums a row differently for another number of rows
    # Row by row, every item runs alone: the grouped kernel must give the same bits.
    alone = torch.cat([lora_ext.lora_delta(inputs["x"][i:i + 1], inputs["lora_a"], inputs["lora_b"],
                                           inputs["slot_ids"][i:i + 1], inputs["scales"], inputs["ranks"])
                       for i in range(40)])
    assert torch.equal(lora_ext.lora_delta(**inputs), alone)


def test_defaults_all_scales_one_and_full_rank():
    inputs = make_inputs(20, 32, 48, 3, 8, torch.float32, "cpu", "with_none", mixed_ranks=False)
    inputs["scales"] = None
    check_lora_delta(lora_ext.lora_delta(**inputs), inputs)


def test_int32_ids_and_ranks_match_int64():
    inputs = make_inputs(40, 64, 64, 6, 16, torch.float32, "cpu", "with_none", ids_dtype=torch.int32)
    inputs["ranks"] = inputs["ranks"].to(torch.int32)
    check_lora_delta(lora_ext.lora_delta(**inputs), inputs)


def test_precomputed_plan_gives_identical_results():
    inputs = make_inputs(300, 128, 96, 9, 16, torch.bfloat16, "cpu", "with_none", seed=11)
    plan = lora_ext.build_plan(inputs["slot_ids"], 9)
    assert torch.equal(lora_ext.lora_delta(**inputs), lora_ext.lora_delta(**inputs, plan=plan))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_thread_count_gives_identical_results(threads):
    inputs = make_inputs(257, 200, 300, 12, 16, torch.float32, "cpu", "unsorted", seed=5)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = lora_ext.lora_delta(**inputs)
        torch.set_num_threads(threads)
        assert torch.equal(lora_ext.lora_delta(**inputs), single)
    finally:
        torch.set_num_threads(previous)


def test_add_lora_into_a_strided_output():
    inputs = make_inputs(30, 40, 50, 4, 8, torch.float32, "cpu", "with_none")
    wide = torch.zeros(30, 100)
    out = wide[:, ::2]
    before = out.clone()
    lora_ext.add_lora_(out, **inputs)
    check_add_lora(out, before, inputs)
    assert (wide[:, 1::2] == 0).all(), "add_lora_ wrote outside the view it was given"


# ---- CUDA: the same checks on every kernel path (skipped without a GPU) ----------------------------

@pytest.fixture(params=CUDA_PATHS)
def cuda_path(request):
    """Runs the test with one CUDA kernel path forced ("mma" falls back to "simt" for float32)."""
    with kernel_config.configured(cuda_kernel=request.param), kernel_config.paths_taken() as taken:
        yield request.param
    if request.param == "simt":
        assert "cuda_mma" not in taken, taken


def cuda_cases():
    for dtype in DTYPES:
        for rows in ROWS + [8192]:
            for d_in, d_out in SIZES:
                if rows * d_out > 40_000_000:
                    continue
                for distribution in DISTRIBUTIONS:
                    yield pytest.param(dtype, rows, d_in, d_out, distribution,
                                       id=f"{str(dtype)[6:]}-T{rows}-{d_in}x{d_out}-{distribution}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,rows,d_in,d_out,distribution", list(cuda_cases()))
def test_matches_reference_cuda(cuda_path, dtype, rows, d_in, d_out, distribution):
    inputs = make_inputs(rows, d_in, d_out, slots_for(distribution, rows), 16, dtype, "cuda",
                         distribution, seed=rows + d_in + d_out)
    run_both_ops(inputs, dtype, f"{cuda_path} T={rows} {d_in}->{d_out} {distribution}")


@pytest.mark.cuda
@pytest.mark.parametrize("slots,rows", [(1, 4096), (16, 8192), (256, 256), (256, 4096), (200, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_slots_and_long_batches_cuda(cuda_path, dtype, slots, rows):
    inputs = make_inputs(rows, 512, 1024, slots, 32, dtype, "cuda", "unsorted", seed=slots)
    run_both_ops(inputs, dtype, f"{cuda_path} S={slots} T={rows}")


@pytest.mark.cuda
@pytest.mark.parametrize("max_rank", [1, 5, 64, 128, 200])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ranks_up_to_max_cuda(cuda_path, dtype, max_rank):
    inputs = make_inputs(300, 256, 520, 7, max_rank, dtype, "cuda", "unsorted", seed=max_rank)
    run_both_ops(inputs, dtype, f"{cuda_path} R={max_rank}")


@pytest.mark.cuda
@pytest.mark.parametrize("b_layout", ["peft", "rank_major"])
@pytest.mark.parametrize("x_layout", ["contiguous", "strided", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_memory_layouts_cuda(cuda_path, dtype, x_layout, b_layout):
    inputs = make_inputs(300, 72, 136, 4, 16, dtype, "cuda", "with_none", seed=3, b_layout=b_layout,
                         x_layout=x_layout)
    run_both_ops(inputs, dtype, f"{cuda_path} x {x_layout}, b {b_layout}")


@pytest.mark.cuda
def test_cuda_plan_equals_cpu_plan():
    for rows, slots in [(0, 1), (1, 1), (1000, 7), (5000, 300), (70, 9000)]:
        ids = torch.randint(-1, slots, (rows,))
        assert torch.equal(lora_ext.build_plan(ids.cuda(), slots).cpu(), lora_ext.build_plan(ids, slots))


@pytest.mark.cuda
def test_out_of_range_ids_give_nan_rows_on_cuda():
    inputs = make_inputs(16, 64, 64, 4, 8, torch.float32, "cuda", "unsorted")
    inputs["slot_ids"][3] = 4
    inputs["slot_ids"][5] = -7
    delta = lora_ext.lora_delta(**inputs).cpu()
    assert torch.isnan(delta[3]).all() and torch.isnan(delta[5]).all()
    others = [t for t in range(16) if t not in (3, 5)]
    assert not torch.isnan(delta[others]).any()
