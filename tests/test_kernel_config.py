"""Kernel settings (lora_ext.kernel_config): read once from the environment, changed through the
Python API, bad values refused; and each CPU path really runs where the settings and shapes say."""

import os
import subprocess
import sys

import pytest
import torch

import lora_ext
from helpers import make_inputs
from kernel_paths import FUSED_MAX_ROWS, HAS_AVX512, HAS_AVX512_BF16
from lora_ext import kernel_config

needs_avx512 = pytest.mark.skipif(not HAS_AVX512, reason="the CPU has no AVX-512")


def delta_paths(inputs, **settings):
    with kernel_config.configured(**settings), kernel_config.paths_taken() as taken:
        lora_ext.lora_delta(**inputs)
    return taken


def test_settings_round_trip_and_restore():
    before = kernel_config.settings()
    assert set(before) == {"cpu_isa", "cpu_gemm_min_rows", "cpu_backward_gemm_min_rows", "cpu_fused_linear",
                           "cpu_avx512_bf16", "cpu_fused_linear_16bit", "cpu_fused_linear_max_rows",
                           "cpu_amx", "cpu_packed_gemm_min_rows", "cuda_kernel"}
    with kernel_config.configured(cpu_isa="portable", cpu_gemm_min_rows=7, cpu_fused_linear=False):
        now = kernel_config.settings()
        assert (now["cpu_isa"], now["cpu_gemm_min_rows"], now["cpu_fused_linear"]) == ("portable", 7, False)
    assert kernel_config.settings() == before


@pytest.mark.parametrize("changes,message", [
    (dict(cpu_isa="avx2"), r"kernel setting 'cpu_isa' is 'avx2' but must be one of 'auto', 'portable'"),
    (dict(cpu_gemm_min_rows=0), r"kernel setting 'cpu_gemm_min_rows' is '0' but must be an integer >= 1"),
    (dict(cuda_kernel="fast"), r"must be one of 'auto', 'simt', 'mma'"),
    (dict(cpu_isa="portable", no_such_thing=1), r"unknown kernel setting 'no_such_thing'; the settings are cpu_isa"),
    (dict(cpu_isa="portable", cpu_gemm_min_rows=-3), r"'cpu_gemm_min_rows' is '-3'"),
    (dict(cpu_fused_linear_16bit="maybe"), r"'cpu_fused_linear_16bit' is 'maybe' but must be one of 'auto', 'on', 'off'"),
    (dict(cpu_fused_linear_max_rows=-1), r"'cpu_fused_linear_max_rows' is '-1' but must be an integer >= 0"),
    (dict(cpu_amx="auto"), r"'cpu_amx' is 'auto' but must be one of 'off', 'on'"),
    (dict(cpu_packed_gemm_min_rows=0), r"'cpu_packed_gemm_min_rows' is '0' but must be an integer >= 1"),
])
def test_bad_settings_refused_and_nothing_changes(changes, message):
    before = kernel_config.settings()
    with pytest.raises(ValueError, match=message):
        kernel_config.configure(**changes)
    assert kernel_config.settings() == before


def run_python(code, **env):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env})
    return result.returncode, result.stdout + result.stderr


def test_environment_read_when_the_module_loads():
    code = "import lora_ext; print(lora_ext.kernel_config.settings())"
    rc, out = run_python(code, LORA_EXT_CPU_ISA="portable", LORA_EXT_CPU_FUSED_LINEAR="off",
                         LORA_EXT_CPU_GEMM_MIN_ROWS="5")
    assert rc == 0, out
    assert "'cpu_isa': 'portable'" in out and "'cpu_fused_linear': False" in out and "'cpu_gemm_min_rows': 5" in out


def test_bad_environment_value_is_a_clear_error():
    rc, out = run_python("import lora_ext; lora_ext.kernel_config.settings()", LORA_EXT_CUDA_KERNEL="tensorcore")
    assert rc != 0
    assert "environment variable LORA_EXT_CUDA_KERNEL is 'tensorcore' but must be one of 'auto', 'simt', 'mma'" in out


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_items_run_four_at_a_time(dtype):
    inputs = make_inputs(40, 256, 300, 48, 16, dtype, "cpu", "distinct", b_layout="rank_major")
    taken = delta_paths(inputs)
    expected_kernel = "cpu_items_avx512_bf16" if dtype == torch.bfloat16 and HAS_AVX512_BF16 else "cpu_items_avx512"
    assert expected_kernel in taken and "cpu_items_quad" in taken, taken
    assert "cpu_items_split" not in taken and "cpu_gemm_segments" not in taken, taken


@needs_avx512
def test_widening_bfloat16_kernel_when_bf16_dot_products_are_off():
    inputs = make_inputs(40, 256, 300, 48, 16, torch.bfloat16, "cpu", "distinct", b_layout="rank_major")
    taken = delta_paths(inputs, cpu_avx512_bf16=False)
    assert "cpu_items_avx512" in taken and "cpu_items_avx512_bf16" not in taken, taken


def test_portable_kernels_when_forced():
    inputs = make_inputs(40, 256, 300, 48, 16, torch.float32, "cpu", "distinct", b_layout="rank_major")
    taken = delta_paths(inputs, cpu_isa="portable")
    assert "cpu_items_portable" in taken and "cpu_items_avx512" not in taken and "cpu_items_quad" not in taken


def test_one_row_is_split_over_threads():
    inputs = make_inputs(1, 4096, 4096, 2, 16, torch.float32, "cpu", "one_slot")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert "cpu_items_split" in delta_paths(inputs)
    finally:
        torch.set_num_threads(previous)


def test_tiny_work_runs_on_the_calling_thread():
    """A call with a few thousand multiply-adds is not split over threads (waking them would cost
    more than the work; csrc/cpu/lora_cpu.cpp kInlineMacs)."""
    inputs = make_inputs(2, 24, 40, 2, 8, torch.float32, "cpu", "one_slot")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        taken = delta_paths(inputs)
        assert "cpu_items_avx512" in taken or "cpu_items_portable" in taken
        assert "cpu_items_split" not in taken
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("rows,min_rows,gemm", [(64, 64, True), (63, 64, False), (5, 5, True), (300, 10**9, False)])
def test_slots_with_many_rows_take_the_gemm_path(rows, min_rows, gemm):
    inputs = make_inputs(rows, 64, 96, 3, 16, torch.float32, "cpu", "one_slot", mixed_ranks=False)
    assert ("cpu_gemm_segments" in delta_paths(inputs, cpu_gemm_min_rows=min_rows)) == gemm


def test_rows_without_adapters_run_no_lora_path():
    inputs = make_inputs(30, 64, 96, 3, 16, torch.float32, "cpu", "all_none")
    assert delta_paths(inputs) == {}


@pytest.mark.parametrize("d_in", [64, 4096, 4097])
@pytest.mark.parametrize("rows", [1, 32, 33, 64, 65, 128, 129])
def test_linear_lora_fuses_exactly_where_the_rule_says(rows, d_in):
    inputs = make_inputs(rows, d_in, 48, 4, 8, torch.float32, "cpu", "unsorted")
    weight = torch.randn(48, d_in)
    args = {k: v for k, v in inputs.items() if k != "x"}
    with kernel_config.paths_taken() as taken:
        lora_ext.linear_lora(inputs["x"], weight, None, **args)
    fuses = kernel_config.linear_lora_fuses(rows, d_in, torch.float32)
    assert fuses == (HAS_AVX512 and (rows <= 32 or (rows <= FUSED_MAX_ROWS and d_in <= 4096)))
    assert taken.get("cpu_linear_fused" if fuses else "cpu_linear_unfused") == 1, taken
    with kernel_config.configured(cpu_fused_linear=False):
        assert not kernel_config.linear_lora_fuses(rows, d_in, torch.float32)
    with kernel_config.configured(cpu_fused_linear_16bit=False):
        assert not kernel_config.linear_lora_fuses(rows, d_in, torch.bfloat16)


@pytest.mark.parametrize("max_rows", [1, 16, 48, 128])
@pytest.mark.parametrize("d_in", [64, 4097])
def test_fused_row_limit_follows_its_setting(max_rows, d_in):
    with kernel_config.configured(cpu_fused_linear_max_rows=max_rows):
        for rows in (1, 16, 17, 32, 33, 48, 49, 128, 129):
            expected = HAS_AVX512 and (rows <= min(32, max_rows) or (rows <= max_rows and d_in <= 4096))
            assert kernel_config.linear_lora_fuses(rows, d_in, torch.float32) == expected, rows


def test_plan_layout_describes_the_plan():
    """The plan groups rows by slot (stable), as the layout says, against a plain Python grouping."""
    ids = torch.tensor([2, -1, 0, 2, 1, 0, -1, 2, 2, 2, 2, 2])
    plan = lora_ext.build_plan(ids, 3)
    layout = lora_ext.ops.plan_layout(3)
    assert plan.numel() == layout["order"] + ids.numel()
    offsets = plan[layout["offsets"]:layout["offsets"] + 6].tolist()  # bins: slots 0-2, none, invalid
    order = plan[layout["order"]:].tolist()
    groups = [order[offsets[b]:offsets[b + 1]] for b in range(4)]
    assert groups == [[2, 5], [4], [0, 3, 7, 8, 9, 10, 11], [1, 6]]
    for part, rows_per_tile in (("decode_tiles", layout["decode_tile_rows"]),
                                ("prefill_tiles", layout["prefill_tile_rows"])):
        tiles = [0]
        for count in (2, 1, 7, 2, 0):
            tiles.append(tiles[-1] + -(-count // rows_per_tile))
        assert plan[layout[part]:layout[part] + 6].tolist() == tiles, part
