"""The deltas of long segments on the AMX tile unit (csrc/cpu/amx_deltas.h), bfloat16 only: every
row count around the 16-row tile, every d_in around the 32-wide k step, every d_out around the
16-column block, ranks from 1 to 64 mixed in one call, rows sorted, unsorted, shuffled and on the
base model, both B layouts, row-strided x and out; checked against the float64 reference under the
rule of tolerances.py, and the tile path really ran."""

import pytest
import torch

from helpers import check_add_lora, check_lora_delta, delta_yardsticks, make_inputs
from kernel_paths import HAS_AMX_BF16
from lora_ext import kernel_config, ops

pytestmark = pytest.mark.skipif(not HAS_AMX_BF16, reason="the AMX deltas need a CPU with AMX-BF16")

EVERY_SEGMENT_ON_TILES = dict(cpu_gemm_min_rows=1)
DISTRIBUTIONS = ("sorted", "unsorted", "with_none", "one_slot", "shuffled", "shuffled_with_none", "zipf")


def cases():
    sizes = [(1, 1), (31, 17), (32, 16), (33, 33), (100, 70), (768, 2048), (2049, 1)]
    rows_list = [1, 15, 16, 17, 100, 513]
    max_ranks = [1, 5, 16, 17, 33, 64]
    for i, (d_in, d_out) in enumerate(sizes):
        for j, rows in enumerate(rows_list):
            if rows * (d_in + d_out) > 600_000:
                continue  # the widest sizes at 100 rows and fewer
            max_rank = max_ranks[(i + j) % len(max_ranks)]
            distribution = DISTRIBUTIONS[(i * 3 + j) % len(DISTRIBUTIONS)]
            yield pytest.param(rows, d_in, d_out, max_rank, distribution,
                               id=f"T{rows}-{d_in}x{d_out}-R{max_rank}-{distribution}")


def run_and_check(inputs, label):
    """lora_delta and add_lora_ (into a row-strided out: every other row of a wider tensor) with
    every segment on the tile unit, each checked against the reference."""
    yardsticks = delta_yardsticks(inputs)
    rows, d_out = inputs["x"].shape[0], inputs["lora_b"].shape[1]
    with kernel_config.configured(**EVERY_SEGMENT_ON_TILES), kernel_config.paths_taken() as taken:
        delta = ops.lora_delta(**inputs)
        wide = torch.randn(rows, d_out + 9, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        out = wide[:, 3:3 + d_out]
        before, wide_before = out.clone(), wide.clone()
        ops.add_lora_(out, **inputs)
    check_lora_delta(delta, inputs, f"lora_delta {label}", yardsticks)
    check_add_lora(out, before, inputs, f"add_lora_ {label}", yardsticks)
    edges = torch.ones(wide.shape[1], dtype=torch.bool)
    edges[3:3 + d_out] = False
    assert torch.equal(wide[:, edges], wide_before[:, edges]), f"{label}: add_lora_ wrote outside out"
    has_delta = inputs["slot_ids"] >= 0
    if inputs["ranks"] is not None:
        has_delta &= inputs["ranks"][inputs["slot_ids"].clamp(min=0)] > 0
    if has_delta.any():
        assert taken.get("cpu_gemm_amx") == 2, taken


@pytest.mark.parametrize("rows,d_in,d_out,max_rank,distribution", list(cases()))
def test_tile_deltas_match_reference(rows, d_in, d_out, max_rank, distribution):
    seed = rows * 7 + d_in + d_out + max_rank
    inputs = make_inputs(rows, d_in, d_out, 6, max_rank, torch.bfloat16, "cpu", distribution, seed=seed,
                         b_layout="rank_major" if seed % 2 else "peft")
    run_and_check(inputs, f"T={rows} {d_in}->{d_out} R={max_rank} {distribution}")


@pytest.mark.parametrize("b_layout", ["peft", "rank_major"])
@pytest.mark.parametrize("max_rank", [1, 16, 64])
def test_row_strided_x_and_both_b_layouts(max_rank, b_layout):
    """x as a column slice of a wider tensor (rows longer than d_in), gathered rows and rows read in
    place alike."""
    inputs = make_inputs(150, 200, 96, 4, max_rank, torch.bfloat16, "cpu", "zipf", seed=max_rank,
                         b_layout=b_layout)
    wide = torch.randn(150, 230).to(torch.bfloat16)
    wide[:, 10:210] = inputs["x"]
    inputs["x"] = wide[:, 10:210]
    run_and_check(inputs, f"row-strided x R={max_rank} {b_layout}")


def test_rows_without_a_delta_stay_untouched():
    """Rows of the base model (and of rank-0 adapters) keep out exactly as it was."""
    inputs = make_inputs(64, 96, 80, 4, 16, torch.bfloat16, "cpu", "shuffled_with_none", seed=3)
    out = torch.randn(64, 80).to(torch.bfloat16)
    before = out.clone()
    with kernel_config.configured(**EVERY_SEGMENT_ON_TILES), kernel_config.paths_taken() as taken:
        ops.add_lora_(out, **inputs)
    assert taken.get("cpu_gemm_amx") == 1, taken
    ids, ranks = inputs["slot_ids"], inputs["ranks"]
    untouched = (ids < 0) | (ranks[ids.clamp(min=0)] == 0)
    assert untouched.any() and (out[untouched] == before[untouched]).all()


@pytest.mark.parametrize("threads", [2, 3])
def test_every_thread_count_gives_identical_results(threads):
    """Each output value is computed whole by one thread in a fixed order, whatever the split."""
    inputs = make_inputs(200, 300, 130, 3, 32, torch.bfloat16, "cpu", "zipf", seed=1)
    before = torch.get_num_threads()
    try:
        with kernel_config.configured(**EVERY_SEGMENT_ON_TILES), kernel_config.paths_taken() as taken:
            torch.set_num_threads(1)
            one = ops.lora_delta(**inputs)
            torch.set_num_threads(threads)
            many = ops.lora_delta(**inputs)
    finally:
        torch.set_num_threads(before)
    assert taken.get("cpu_gemm_amx") == 2, taken
    assert torch.equal(one, many)


def test_off_switch_takes_the_aten_gemms():
    """cpu_amx=False sends the segments back to ATen's GEMMs, with the same result within the rule."""
    inputs = make_inputs(64, 96, 80, 3, 16, torch.bfloat16, "cpu", "sorted", seed=2)
    with kernel_config.configured(cpu_amx=False, **EVERY_SEGMENT_ON_TILES), kernel_config.paths_taken() as taken:
        delta = ops.lora_delta(**inputs)
    assert "cpu_gemm_amx" not in taken and taken.get("cpu_gemm_segments") == 1, taken
    check_lora_delta(delta, inputs, "lora_delta cpu_amx=False")
