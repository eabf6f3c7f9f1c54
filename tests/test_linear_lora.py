"""linear_lora: the base linear layer and each row's LoRA delta in one op, against the float64
reference, on the fused CPU path (float32 decode batches) and on the unfused one."""

import pytest
import torch

import lora_ext
import lora_ext.reference
from lora_ext import kernel_config
from kernel_paths import FUSED_MAX_ROWS, HAS_AMX_BF16, HAS_AVX512, HAS_AVX512_BF16, HAS_AVX512_FP16
from helpers import DISTRIBUTIONS, assert_rows_match, magnitude64, make_inputs, pytorch_linear_lora, reference64

# The fused path as the rule picks its base GEMM (float32 on packed blocks of W from
# cpu_packed_gemm_min_rows rows, dot-product tiles below), either GEMM at every row count, and ATen's
# linear then the deltas.
FUSED = {"fused": {}, "fused_packed": {"cpu_packed_gemm_min_rows": 1},
         "fused_tiles": {"cpu_packed_gemm_min_rows": 1_000_000_000}, "unfused": {"cpu_fused_linear": False}}
# Rows around the fused path's limits (32 rows; 128 when d_in <= 4096; a slot of 64 rows is a GEMM
# segment; the packed GEMM from 48 rows, in blocks of 8) and sizes around both GEMMs' blocks (tiles:
# 4 rows x 6 columns x 16 along d_in; packed: 48 columns x 128 along d_in), d_in above 4096 once.
ROWS = [0, 1, 5, 32, 33, 47, 48, 64, 65, 128, 129]
SIZES = [(1, 1), (3, 64), (64, 3), (17, 13), (129, 49), (768, 256), (4097, 64), (64, 4097)]


@pytest.fixture(params=list(FUSED))
def fusion(request):
    """Runs the test with linear_lora's fused CPU path as configured or turned off; checks that
    the calls took the base GEMM the configuration asks for."""
    with kernel_config.configured(**FUSED[request.param]), kernel_config.paths_taken() as taken:
        yield request.param
    if request.param == "unfused":
        assert "cpu_linear_fused" not in taken, taken
    if request.param == "fused_packed" and "cpu_linear_fused" in taken:
        assert taken.get("cpu_linear_packed") == taken["cpu_linear_fused"], taken
    if request.param == "fused_tiles":
        assert "cpu_linear_packed" not in taken, taken


def base_layer(d_in, d_out, with_bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(dtype)
    bias = torch.randn(d_out, generator=g).to(dtype) if with_bias else None
    return weight, bias


def yardsticks(inputs, weight, bias):
    """What tolerances.py's rule compares with: the float64 result, the same done by PyTorch in the
    inputs' dtype, and the float64 result on absolute values (|x| |W|^T + |bias| + |delta terms|)."""
    x, w = inputs["x"].cpu().double(), weight.cpu().double()
    base = x @ w.T + (bias.cpu().double() if bias is not None else 0)
    magnitude = x.abs() @ w.abs().T + (bias.cpu().double().abs() if bias is not None else 0) + magnitude64(inputs)
    return base + reference64(inputs), pytorch_linear_lora(inputs, weight, bias), magnitude


def check(inputs, weight, bias, dtype, label):
    expected, pytorch, magnitude = yardsticks(inputs, weight, bias)
    out = lora_ext.linear_lora(inputs["x"], weight, bias, **{k: v for k, v in inputs.items() if k != "x"})
    assert out.dtype == dtype and out.shape == expected.shape
    assert_rows_match(out, expected, pytorch, magnitude, dtype, what=f"linear_lora {label}")


def cases():
    for rows in ROWS:
        for d_in, d_out in SIZES:
            for distribution in DISTRIBUTIONS:
                yield pytest.param(rows, d_in, d_out, distribution, id=f"T{rows}-{d_in}x{d_out}-{distribution}")


@pytest.mark.parametrize("rows,d_in,d_out,distribution", list(cases()))
def test_float32_matches_reference(fusion, rows, d_in, d_out, distribution):
    seed = rows + d_in + d_out
    inputs = make_inputs(rows, d_in, d_out, 5 if distribution != "distinct" else max(1, min(rows, 64)), 16,
                         torch.float32, "cpu", distribution, seed=seed, b_layout="rank_major" if seed % 2 else "peft")
    weight, bias = base_layer(d_in, d_out, seed % 3 != 0, torch.float32, seed)
    check(inputs, weight, bias, torch.float32, f"{fusion} T={rows} {d_in}->{d_out} {distribution}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 32, 200])
def test_half_dtypes_match_reference(dtype, rows):
    inputs = make_inputs(rows, 96, 80, 6, 16, dtype, "cpu", "with_none", seed=rows)
    weight, bias = base_layer(96, 80, True, dtype, rows)
    check(inputs, weight, bias, dtype, f"{dtype} T={rows}")


# linear_lora's 16-bit paths: fused as the CPU allows (the AMX path where the CPU has AMX), fused on
# lora_ext's AVX-512 GEMM (vdpbf16ps for bfloat16 where the CPU has AVX512-BF16), the same widening
# to float32, and ATen's linear.
HALF_PATHS = {"fused": {"cpu_fused_linear_16bit": True},
              "fused_avx512": {"cpu_fused_linear_16bit": True, "cpu_amx": False},
              "fused_widening": {"cpu_fused_linear_16bit": True, "cpu_avx512_bf16": False, "cpu_amx": False},
              "unfused": {"cpu_fused_linear_16bit": False}}
# d_in around the tiles' steps along k (16 widening, 32 with vdpbf16ps)
HALF_SIZES = [(1, 1), (17, 13), (33, 7), (64, 3), (3, 64), (768, 256), (100, 1500)]


def half_cases():
    for dtype in (torch.float16, torch.bfloat16):
        for path in HALF_PATHS:
            if path == "fused_widening" and dtype != torch.bfloat16:
                continue
            for rows in (1, 5, 32, 33, 65, 129):
                for i, (d_in, d_out) in enumerate(HALF_SIZES):
                    distribution = DISTRIBUTIONS[(rows + i) % len(DISTRIBUTIONS)]
                    yield pytest.param(dtype, path, rows, d_in, d_out, distribution,
                                       id=f"{str(dtype)[6:]}-{path}-T{rows}-{d_in}x{d_out}-{distribution}")


@pytest.mark.parametrize("dtype,path,rows,d_in,d_out,distribution", list(half_cases()))
def test_half_dtypes_on_each_path(dtype, path, rows, d_in, d_out, distribution):
    """Every 16-bit path against the float64 reference, and the path the rule says is the one
    that ran."""
    seed = rows * 7 + d_in
    inputs = make_inputs(rows, d_in, d_out, 5 if distribution != "distinct" else max(1, min(rows, 64)), 16,
                         dtype, "cpu", distribution, seed=seed, b_layout="rank_major" if seed % 2 else "peft")
    weight, bias = base_layer(d_in, d_out, seed % 3 != 0, dtype, seed)
    with kernel_config.configured(**HALF_PATHS[path]), kernel_config.paths_taken() as taken:
        check(inputs, weight, bias, dtype, f"{path} {dtype} T={rows} {d_in}->{d_out} {distribution}")
        fuses = kernel_config.linear_lora_fuses(rows, d_in, dtype)
    assert fuses == (path != "unfused" and HAS_AVX512 and (rows <= 32 or (rows <= FUSED_MAX_ROWS and d_in <= 4096)))
    # a slot with cpu_gemm_min_rows (64) rows or more runs as ATen GEMMs, which the AVX-512 fused call does
    # not take (the AMX one takes any rows per slot)
    ids = inputs["slot_ids"]
    gemm_slot = bool((ids >= 0).any()) and int(torch.bincount(ids[ids >= 0]).max()) >= 64
    amx = fuses and HAS_AMX_BF16 and HALF_PATHS[path].get("cpu_amx", True)
    assert taken.get("cpu_linear_fused" if fuses and (amx or not gemm_slot) else "cpu_linear_unfused") == 1, taken
    assert taken.get("cpu_linear_amx") == (1 if amx else None), taken


def test_half_dtypes_fuse_where_lora_ext_has_the_librarys_unit():
    """The "auto" rule: both 16-bit dtypes fuse on the AMX path where the CPU has AMX (float16 from 9
    rows: below, ATen's AVX512-FP16 GEMM is as fast); elsewhere bfloat16 with AVX512-BF16 and float16
    without AVX512-FP16 (CPU flags read from /proc/cpuinfo here, from CPUID in the module)."""
    with kernel_config.configured(cpu_fused_linear_16bit="auto"):
        assert kernel_config.linear_lora_fuses(32, 768, torch.bfloat16) == (HAS_AVX512_BF16 or HAS_AMX_BF16)
        assert kernel_config.linear_lora_fuses(1, 768, torch.bfloat16) == (HAS_AVX512_BF16 or HAS_AMX_BF16)
        assert kernel_config.linear_lora_fuses(32, 768, torch.float16) == (
            HAS_AMX_BF16 or (HAS_AVX512 and not HAS_AVX512_FP16))
        assert kernel_config.linear_lora_fuses(9, 768, torch.float16) == kernel_config.linear_lora_fuses(
            32, 768, torch.float16)
        assert kernel_config.linear_lora_fuses(8, 768, torch.float16) == (
            HAS_AVX512 and not HAS_AVX512_FP16)
        assert not kernel_config.linear_lora_fuses(129, 768, torch.bfloat16)
    with kernel_config.configured(cpu_fused_linear_16bit="auto", cpu_amx=False):
        assert kernel_config.linear_lora_fuses(32, 768, torch.bfloat16) == (HAS_AVX512_BF16 and not HAS_AMX_BF16)
        assert kernel_config.linear_lora_fuses(32, 768, torch.float16) == (HAS_AVX512 and not HAS_AVX512_FP16)
    with kernel_config.configured(cpu_fused_linear_16bit=True, cpu_fused_linear=False):
        assert not kernel_config.linear_lora_fuses(32, 768, torch.bfloat16)
    assert not kernel_config.linear_lora_fuses(32, 768, torch.float64)


# The AMX path (bfloat16, and float16 as pairs of bfloat16 parts, where the CPU has AMX): sizes around
# its tiles (16 rows, 16 columns, 32 values of k), ranks around its 16-rank shrink tiles, a maximum
# rank under 16 (bfloat16 A's tiles then come from a padded copy), both layouts of B, every distribution.
AMX_SIZES = [(1, 1), (31, 17), (32, 16), (33, 40), (100, 1500), (1024, 48), (4097, 20)]


def amx_cases():
    for dtype in (torch.bfloat16, torch.float16):
        for rows in (1, 15, 16, 17, 33, 64, 100, 128):
            for i, (d_in, d_out) in enumerate(AMX_SIZES):
                if rows > 32 and d_in > 4096:
                    continue
                distribution = DISTRIBUTIONS[(rows + i) % len(DISTRIBUTIONS)]
                max_rank = (1, 5, 16, 17, 40)[(rows + 2 * i) % 5]
                yield pytest.param(dtype, rows, d_in, d_out, distribution, max_rank,
                                   id=f"{str(dtype)[6:]}-T{rows}-{d_in}x{d_out}-{distribution}-R{max_rank}")


@pytest.mark.skipif(not HAS_AMX_BF16, reason="the AMX path needs a CPU with AMX-BF16")
@pytest.mark.parametrize("dtype,rows,d_in,d_out,distribution,max_rank", list(amx_cases()))
def test_amx_path_matches_reference(dtype, rows, d_in, d_out, distribution, max_rank):
    seed = rows * 11 + d_in + max_rank
    slots = 5 if distribution != "distinct" else max(1, min(rows, 64))
    inputs = make_inputs(rows, d_in, d_out, slots, max_rank, dtype, "cpu", distribution, seed=seed,
                         b_layout="rank_major" if seed % 2 else "peft")
    weight, bias = base_layer(d_in, d_out, seed % 3 != 0, dtype, seed)
    with kernel_config.configured(cpu_fused_linear_16bit=True), kernel_config.paths_taken() as taken:
        check(inputs, weight, bias, dtype, f"AMX {dtype} T={rows} {d_in}->{d_out} {distribution} R={max_rank}")
    assert taken.get("cpu_linear_amx") == 1, taken


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_fused_paths_take_row_strides(dtype):
    """x and W as column slices of wider tensors (rows longer than d_in), the fused 16-bit path (AMX
    where the CPU has it) against the reference."""
    inputs = make_inputs(24, 100, 70, 6, 16, dtype, "cpu", "zipf", seed=5, b_layout="rank_major")
    wide = torch.randn(24, 160).to(dtype)
    wide[:, :100] = inputs["x"]
    inputs["x"] = wide[:, :100]
    weight, bias = base_layer(100, 70, True, dtype, 5)
    wide_w = torch.randn(70, 130).to(dtype)
    wide_w[:, :100] = weight
    with kernel_config.configured(cpu_fused_linear_16bit=True), kernel_config.paths_taken() as taken:
        check(inputs, wide_w[:, :100], bias, dtype, f"row strides {dtype}")
    assert taken.get("cpu_linear_fused") == (1 if HAS_AVX512 else None), taken


@pytest.mark.parametrize("max_rank", [1, 5, 64, 128])
def test_ranks_up_to_max(fusion, max_rank):
    inputs = make_inputs(32, 200, 70, 8, max_rank, torch.float32, "cpu", "unsorted", seed=max_rank)
    weight, bias = base_layer(200, 70, True, torch.float32, max_rank)
    check(inputs, weight, bias, torch.float32, f"{fusion} R={max_rank}")


@pytest.mark.parametrize("rows", [24, 100])
def test_float32_fused_paths_take_row_strides(rows):
    """x and W as column slices of wider tensors (rows longer than d_in): the tile GEMM (24 rows)
    and the packed one (100 rows) against the reference."""
    inputs = make_inputs(rows, 100, 70, 6, 16, torch.float32, "cpu", "zipf", seed=rows, b_layout="rank_major")
    wide = torch.randn(rows, 160)
    wide[:, 20:120] = inputs["x"]
    inputs["x"] = wide[:, 20:120]
    weight, bias = base_layer(100, 70, True, torch.float32, rows)
    wide_w = torch.randn(70, 131)
    wide_w[:, 5:105] = weight
    with kernel_config.paths_taken() as taken:
        check(inputs, wide_w[:, 5:105], bias, torch.float32, f"row strides float32 T={rows}")
    assert taken.get("cpu_linear_fused") == (1 if HAS_AVX512 else None), taken
    assert taken.get("cpu_linear_packed") == (1 if HAS_AVX512 and rows >= 48 else None), taken


@pytest.mark.parametrize("layout", ["x_transposed", "weight_transposed", "bias_strided"])
def test_non_contiguous_arguments(layout):
    inputs = make_inputs(16, 48, 40, 4, 8, torch.float32, "cpu", "with_none",
                         x_layout="transposed" if layout == "x_transposed" else "contiguous")
    weight, bias = base_layer(48, 40, True, torch.float32, 3)
    if layout == "weight_transposed":
        weight = weight.T.contiguous().T
    if layout == "bias_strided":
        bias = torch.randn(80)[::2]
    check(inputs, weight, bias, torch.float32, layout)


@pytest.mark.parametrize("rows", [32, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [2, 3])
def test_every_thread_count_gives_identical_results(threads, dtype, rows):
    """Each output value is computed whole by one thread in a fixed order, whatever the split (the
    16-bit dtypes on the AMX path where the CPU has it, on the AVX-512 one elsewhere; float32 at 100
    rows on the packed GEMM)."""
    inputs = make_inputs(rows, 300, 130, 40, 16, dtype, "cpu", "zipf")
    weight, bias = base_layer(300, 130, True, dtype, 0)
    args = {k: v for k, v in inputs.items() if k != "x"}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = lora_ext.linear_lora(inputs["x"], weight, bias, **args)
        torch.set_num_threads(threads)
        assert torch.equal(lora_ext.linear_lora(inputs["x"], weight, bias, **args), single)
    finally:
        torch.set_num_threads(before)


def test_fused_and_unfused_paths_agree():
    inputs = make_inputs(32, 768, 256, 32, 16, torch.float32, "cpu", "distinct")
    weight, bias = base_layer(768, 256, False, torch.float32, 1)
    args = {k: v for k, v in inputs.items() if k != "x"}
    with kernel_config.paths_taken() as taken:
        fused = lora_ext.linear_lora(inputs["x"], weight, bias, **args)
    if kernel_config.linear_lora_fuses(32, 768, torch.float32):
        assert taken.get("cpu_linear_fused") == 1, taken
    with kernel_config.configured(cpu_fused_linear=False), kernel_config.paths_taken() as taken:
        unfused = lora_ext.linear_lora(inputs["x"], weight, bias, **args)
    assert taken.get("cpu_linear_unfused") == 1, taken
    expected, pytorch, magnitude = yardsticks(inputs, weight, bias)
    assert_rows_match(fused, expected, pytorch, magnitude, torch.float32, what="fused")
    assert_rows_match(unfused, expected, pytorch, magnitude, torch.float32, what="unfused")
    assert_rows_match(fused, unfused.double(), pytorch, magnitude, torch.float32, what="fused vs unfused")


@pytest.mark.parametrize("bad,message", [
    ("weight_shape", r"weight must have shape \(d_out, d_in\) = \(40, 48\) to match x and lora_b, but has shape .48, 40."),
    ("weight_dtype", r"weight has dtype (torch.float64|Double) but x has dtype (torch.float32|Float)"),
    ("bias_shape", r"bias must have shape \(d_out,\) = \(40,\), but has shape .39,?."),
    ("bias_dtype", r"bias has dtype (torch.float16|Half) but x has dtype (torch.float32|Float)"),
])
def test_bad_base_arguments_raise_clear_errors(bad, message):
    inputs = make_inputs(8, 48, 40, 4, 8, torch.float32, "cpu", "unsorted")
    weight, bias = base_layer(48, 40, True, torch.float32, 0)
    if bad == "weight_shape":
        weight = weight.T.contiguous()
    elif bad == "weight_dtype":
        weight = weight.double()
    elif bad == "bias_shape":
        bias = bias[:39]
    elif bad == "bias_dtype":
        bias = bias.half()
    args = {k: v for k, v in inputs.items() if k != "x"}
    with pytest.raises(ValueError, match=message):
        lora_ext.linear_lora(inputs["x"], weight, bias, **args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 32, 300])
def test_matches_reference_cuda(dtype, rows):
    inputs = make_inputs(rows, 96, 80, 6, 16, dtype, "cuda", "with_none", seed=rows)
    weight, bias = base_layer(96, 80, True, dtype, rows)
    check(inputs, weight.cuda(), bias.cuda(), dtype, f"cuda {dtype} T={rows}")


@pytest.mark.parametrize("d_in,d_out", [(17, 13), (768, 2048), (100, 1500)])
def test_decode_rows_give_the_same_bits_alone_and_batched(d_in, d_out):
    """Distinct adapters with one row each run four items at a time on the fused path; each row
    computed alone (one item) must give the same bits (lora_ext's tile GEMM sums each output the
    same way for any number of rows; ATen's unfused GEMM need not, and neither need the packed GEMM
    from cpu_packed_gemm_min_rows rows, which sums k in chunks: so this is 33 rows, fused)."""
    if not kernel_config.linear_lora_fuses(33, d_in, torch.float32):
        pytest.skip("linear_lora does not fuse on this CPU (no AVX-512)")
    inputs = make_inputs(33, d_in, d_out, 40, 16, torch.float32, "cpu", "distinct", seed=d_out,
                         mixed_ranks=False, b_layout="rank_major")
    weight, bias = base_layer(d_in, d_out, True, torch.float32, d_in)
    args = {k: v for k, v in inputs.items() if k not in ("x", "slot_ids")}
    with kernel_config.paths_taken() as taken:
        batched = lora_ext.linear_lora(inputs["x"], weight, bias, slot_ids=inputs["slot_ids"], **args)
    assert taken.get("cpu_linear_fused") == 1 and "cpu_items_quad" in taken, taken
    with kernel_config.paths_taken() as taken:
        alone = torch.cat([lora_ext.linear_lora(inputs["x"][i:i + 1], weight, bias,
                                                slot_ids=inputs["slot_ids"][i:i + 1], **args) for i in range(33)])
    assert taken.get("cpu_linear_fused") == 33 and "cpu_items_quad" not in taken, taken
    assert torch.equal(batched, alone)
    check(inputs, weight, bias, torch.float32, f"fused decode {d_in}->{d_out}")
