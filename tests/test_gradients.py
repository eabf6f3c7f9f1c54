"""Gradients of every op (autograd through lora_backward) against the float64 autograd of the
reference, under the rule of tolerances.py: dtypes, row counts, odd and wide sizes, adapter
distributions, mixed ranks with NaN beyond each rank, memory layouts, every CPU kernel
configuration; row isolation; exact zeros; opcheck, gradcheck and torch.compile."""

import pytest
import torch

import lora_ext
import lora_ext.reference
from grad_helpers import Leaves, check_grads, op_grads, upstream_grad, zero_weight_rows
from helpers import DISTRIBUTIONS, make_inputs
from kernel_paths import CPU_CONFIGS, HAS_AVX512
from lora_ext import kernel_config
from lora_ext.reference import lora_delta_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = ["lora_delta", "add_lora_", "linear_lora"]
def slots_for(distribution, rows):
    return min(max(rows, 1), 64) if distribution == "distinct" else 5


def base_layer(d_in, d_out, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(dtype), torch.randn(d_out, generator=g).to(dtype)


def run_op(op, inputs, label):
    weight, bias = base_layer(inputs["x"].shape[1], inputs["lora_b"].shape[1], inputs["x"].dtype)
    check_grads(op, inputs, label, weight=weight, bias=bias)


def matrix():
    for dtype in DTYPES:
        for rows in (0, 1, 7, 64, 1037):
            for d_in, d_out in ((1, 1), (3, 64), (64, 3), (4097, 64), (64, 4097), (128, 32000)):
                if rows * max(d_in, d_out) > 300_000 and not (dtype == torch.bfloat16 and rows == 64):
                    continue  # the widest and longest cases run once, in bfloat16
                for distribution in DISTRIBUTIONS:
                    yield pytest.param(dtype, rows, d_in, d_out, distribution,
                                       id=f"{str(dtype)[6:]}-T{rows}-{d_in}x{d_out}-{distribution}")


@pytest.mark.parametrize("dtype,rows,d_in,d_out,distribution", list(matrix()))
def test_lora_delta_gradients_match_reference(dtype, rows, d_in, d_out, distribution):
    inputs = make_inputs(rows, d_in, d_out, slots_for(distribution, rows), 16, dtype, "cpu", distribution,
                         seed=rows + d_in + d_out, b_layout="rank_major" if rows % 2 else "peft")
    check_grads("lora_delta", inputs, f"T={rows} {d_in}->{d_out} {distribution}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d_in,d_out,distribution", [
    (1, 4096, 4096, "one_slot"), (7, 3, 64, "with_none"), (40, 67, 130, "distinct"), (300, 1, 17, "unsorted"),
    (200, 64, 97, "sorted")])
def test_every_op_in_every_cpu_config(cpu_config, op, dtype, rows, d_in, d_out, distribution):
    inputs = make_inputs(rows, d_in, d_out, slots_for(distribution, rows), 16, dtype, "cpu", distribution,
                         seed=rows * 3 + d_out, b_layout="rank_major")
    run_op(op, inputs, f"{cpu_config} T={rows} {d_in}->{d_out} {distribution}")


@pytest.mark.parametrize("b_layout", ["peft", "rank_major"])
@pytest.mark.parametrize("x_layout", ["contiguous", "strided", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_memory_layouts(cpu_config, dtype, x_layout, b_layout):
    inputs = make_inputs(133, 72, 136, 4, 16, dtype, "cpu", "with_none", seed=3, b_layout=b_layout,
                         x_layout=x_layout)
    check_grads("lora_delta", inputs, f"{cpu_config} x {x_layout}, b {b_layout}")


@pytest.mark.parametrize("max_rank", [1, 5, 17, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ranks_up_to_max(dtype, max_rank):
    inputs = make_inputs(50, 96, 200, 7, max_rank, dtype, "cpu", "unsorted", seed=max_rank, b_layout="rank_major")
    check_grads("lora_delta", inputs, f"R={max_rank}")


@pytest.mark.skipif(not HAS_AVX512, reason="the CPU has no AVX-512")
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_backward_runs_four_units_at_a_time(dtype):
    """One row per adapter: the products v and u of four slots at a time (same values as one by one)."""
    inputs = make_inputs(40, 256, 300, 40, 16, dtype, "cpu", "distinct", b_layout="rank_major")
    with kernel_config.paths_taken() as taken:
        check_grads("lora_delta", inputs, "decode")
    assert "cpu_items_quad" in taken, taken


def test_non_contiguous_upstream_gradient():
    inputs = make_inputs(30, 40, 50, 4, 8, torch.float32, "cpu", "with_none", b_layout="rank_major")
    leaves = Leaves(inputs)
    out = lora_ext.lora_delta(leaves.x, leaves.lora_a, leaves.lora_b, inputs["slot_ids"], inputs["scales"],
                              inputs["ranks"])
    g = upstream_grad((50, 30), torch.float32, "cpu").t()  # column-major
    strided = torch.autograd.grad(out, leaves.tensors(), g, retain_graph=True)
    dense = torch.autograd.grad(out, leaves.tensors(), g.contiguous())
    for a, b in zip(strided, dense):  # the strided dy takes the portable shrink: other roundings
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- what the gradients must never do ------------------------------------------------------------

@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["dy", "x"])
@pytest.mark.parametrize("config", ["default", "portable", "gemm_always"])
def test_a_bad_row_changes_no_other_slot_or_row(config, where, poison):
    """A NaN or inf in one row's dy (or x) reaches only that row's dx and that row's slot's dA and
    dB: every other row's dx and every other slot's dA/dB are bitwise what they were."""
    inputs = make_inputs(90, 64, 80, 6, 8, torch.float32, "cpu", "unsorted", seed=5, mixed_ranks=False,
                         b_layout="rank_major")
    bad_row = 17
    bad_slot = int(inputs["slot_ids"][bad_row])
    g = upstream_grad((90, 80), torch.float32, "cpu")
    with kernel_config.configured(**CPU_CONFIGS[config]):
        clean = op_grads("lora_delta", inputs, g)
        if where == "dy":
            g = g.clone()
            g[bad_row, 3] = poison
        else:
            inputs = dict(inputs, x=inputs["x"].clone())
            inputs["x"][bad_row, 3] = poison
        dirty = op_grads("lora_delta", inputs, g)
    other_rows = torch.arange(90) != bad_row
    other_slots = torch.arange(6) != bad_slot
    assert torch.equal(dirty[0][other_rows], clean[0][other_rows])
    assert torch.equal(dirty[1][other_slots], clean[1][other_slots])
    assert torch.equal(dirty[2][other_slots], clean[2][other_slots])
    assert not torch.isfinite(dirty[1][bad_slot]).all(), "the bad row should reach its own slot's dA"


@pytest.mark.parametrize("config", list(CPU_CONFIGS))
def test_gradients_beyond_rank_and_of_absent_slots_are_exactly_zero(config):
    inputs = make_inputs(40, 48, 56, 9, 16, torch.bfloat16, "cpu", "unsorted", seed=2, b_layout="rank_major")
    inputs["slot_ids"][inputs["slot_ids"] == 3] = 4  # slot 3 has no rows
    with kernel_config.configured(**CPU_CONFIGS[config]):
        _, da, db = op_grads("lora_delta", inputs, upstream_grad((40, 56), torch.bfloat16, "cpu"))
    zero = zero_weight_rows(inputs)
    assert zero.reshape(9, 16)[3].all()
    for grad in (da, db):
        rows = grad.reshape(-1, grad.shape[-1])
        assert (rows[zero] == 0).all() and not torch.signbit(rows[zero]).any()
        assert torch.isfinite(rows).all()


def test_frozen_base_gets_no_gradient_and_costs_nothing():
    """linear_lora with a base that does not require grad: its backward computes no tensor the
    size of the weight (no dW, no buffer for it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    inputs = make_inputs(16, 96, 80, 4, 8, torch.float32, "cpu", "with_none")
    weight, bias = base_layer(96, 80, torch.float32)
    leaves = Leaves(inputs)
    out = lora_ext.linear_lora(leaves.x, weight, bias, leaves.lora_a, leaves.lora_b, inputs["slot_ids"],
                               inputs["scales"], inputs["ranks"])

    class Shapes(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in (result if isinstance(result, (tuple, list)) else [result]):
                if isinstance(t, torch.Tensor):
                    self.seen.append((str(func), tuple(t.shape)))
            return result

    with Shapes() as mode:
        out.backward(upstream_grad((16, 80), torch.float32, "cpu"))
    assert weight.grad is None and bias.grad is None
    assert not [s for s in mode.seen if s[1] in ((80, 96), (96, 80), (80,))], mode.seen
    assert leaves.x.grad is not None and leaves.lora_a.grad is not None


def test_linear_lora_base_gradients_when_trained():
    inputs = make_inputs(24, 40, 30, 3, 8, torch.float32, "cpu", "with_none")
    weight, bias = (t.requires_grad_() for t in base_layer(40, 30, torch.float32))
    out = lora_ext.linear_lora(inputs["x"], weight, bias, **{k: v for k, v in inputs.items() if k != "x"})
    g = upstream_grad((24, 30), torch.float32, "cpu")
    dw, db = torch.autograd.grad(out, (weight, bias), g)
    torch.testing.assert_close(dw.double(), g.double().T @ inputs["x"].double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db.double(), g.double().sum(0), rtol=1e-5, atol=1e-5)


def test_add_lora_passes_the_gradient_to_the_old_out():
    inputs = make_inputs(12, 16, 20, 3, 4, torch.float32, "cpu", "with_none")
    base = torch.randn(12, 20, requires_grad=True)
    out = base * 2  # a non-leaf that add_lora_ may change in place
    lora_ext.add_lora_(out, **inputs)
    g = upstream_grad((12, 20), torch.float32, "cpu")
    (dbase,) = torch.autograd.grad(out, base, g)
    torch.testing.assert_close(dbase, 2 * g)


def test_lora_backward_refuses_bad_grad_out():
    inputs = make_inputs(6, 16, 20, 3, 4, torch.float32, "cpu", "with_none")
    args = [inputs[k] for k in ("x", "lora_a", "lora_b", "slot_ids", "scales", "ranks")]
    with pytest.raises(ValueError, match=r"lora_backward: grad_out must have shape \(T, d_out\) = \(6, 20\)"):
        torch.ops.lora_ext.lora_backward(torch.zeros(6, 19), *args, None, [True, True, True])
    with pytest.raises(ValueError, match=r"lora_backward: grad_out has dtype \S+ but x has dtype"):
        torch.ops.lora_ext.lora_backward(torch.zeros(6, 20).double(), *args, None, [True, True, True])


# ---- the PyTorch machinery ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_with_inputs_that_require_grad(dtype):
    inputs = make_inputs(9, 24, 40, 3, 8, dtype, "cpu", "with_none")
    plan = lora_ext.build_plan(inputs["slot_ids"], 3)
    x, a, b = (inputs[k].requires_grad_() for k in ("x", "lora_a", "lora_b"))
    rest = [inputs["slot_ids"], inputs["scales"], inputs["ranks"]]
    weight = torch.randn(40, 24, dtype=dtype, requires_grad=True)
    bias = torch.randn(40, dtype=dtype, requires_grad=True)
    cases = [(torch.ops.lora_ext.lora_delta.default, (x, a, b, *rest, plan)),
             (torch.ops.lora_ext.lora_delta.default, (x, a, b, *rest, None)),
             (torch.ops.lora_ext.add_lora_.default, (torch.randn(9, 40, dtype=dtype), x, a, b, *rest, plan)),
             (torch.ops.lora_ext.linear_lora.default, (x, weight, bias, a, b, *rest, plan)),
             (torch.ops.lora_ext.linear_lora.default, (x, weight.detach(), None, a, b, *rest, None))]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


def test_gradcheck_of_the_reference_in_float64():
    """The oracle's own gradients (autograd through lora_ext.reference) against finite differences."""
    inputs = make_inputs(7, 6, 5, 3, 4, torch.float64, "cpu", "with_none", mixed_ranks=False)
    ids, scales, ranks = inputs["slot_ids"], inputs["scales"], torch.tensor([4, 2, 3])

    def f(x, a, b):
        return lora_delta_ref(x, a, b, ids, scales, ranks, compute_dtype=torch.float64)

    args = tuple(inputs[k].detach().clone().requires_grad_() for k in ("x", "lora_a", "lora_b"))
    assert torch.autograd.gradcheck(f, args)


def test_float32_kernels_against_finite_differences():
    """The native backward against central differences of the native forward, in float32: each
    directional derivative within 1e-2 relative (the step's truncation and float32 rounding)."""
    inputs = make_inputs(11, 20, 24, 3, 6, torch.float32, "cpu", "with_none", mixed_ranks=False)
    leaves = Leaves(inputs)
    rest = (inputs["slot_ids"], inputs["scales"], inputs["ranks"])
    g = upstream_grad((11, 24), torch.float32, "cpu")
    out = lora_ext.lora_delta(leaves.x, leaves.lora_a, leaves.lora_b, *rest)
    grads = torch.autograd.grad(out, leaves.tensors(), g)
    gen = torch.Generator().manual_seed(4)
    for i, leaf in enumerate(leaves.tensors()):
        direction = torch.randn(leaf.shape, generator=gen)
        step = 1e-2

        def loss(shift):
            moved = [t.detach() + (shift * direction if j == i else 0) for j, t in enumerate(leaves.tensors())]
            b = moved[2].transpose(1, 2) if leaves.rank_major else moved[2]
            return (lora_ext.lora_delta(moved[0], moved[1], b, *rest).double() * g.double()).sum()

        numeric = (loss(step) - loss(-step)) / (2 * step)
        analytic = (grads[i].double() * direction.double()).sum()
        assert abs(float(numeric - analytic)) <= 1e-2 * abs(float(analytic)) + 1e-4, (i, numeric, analytic)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("wanted", [("x",), ("lora_a",), ("lora_b",), ("weight",), ("bias",), ("lora_a", "weight"),
                                    ("x", "lora_b", "bias")])
def test_linear_lora_gives_each_asked_gradient(with_bias, wanted):
    """Any subset of linear_lora's inputs asking for a gradient, with and without a bias (its
    Autograd kernel counts only the tensors given), against autograd through the reference."""
    if "bias" in wanted and not with_bias:
        pytest.skip("no bias to differentiate")
    inputs = make_inputs(20, 24, 36, 4, 8, torch.float32, "cpu", "with_none", seed=len(wanted))
    weight, bias = base_layer(24, 36, torch.float32, seed=3)
    tensors = dict(x=inputs["x"], weight=weight, bias=bias if with_bias else None,
                   lora_a=torch.nan_to_num(inputs["lora_a"]), lora_b=torch.nan_to_num(inputs["lora_b"]))
    rest = (inputs["slot_ids"], inputs["scales"], inputs["ranks"])
    g = upstream_grad((20, 36), torch.float32, "cpu")

    def grads(fn):
        leaves = {k: (v.detach().clone().requires_grad_(k in wanted) if v is not None else None)
                  for k, v in tensors.items()}
        out = fn(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"], *rest)
        return torch.autograd.grad(out, [leaves[k] for k in wanted], g)

    for got, expected, name in zip(grads(lora_ext.linear_lora), grads(lora_ext.reference.linear_lora_ref), wanted):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("b_layout", ["peft", "rank_major"])  # rank-major: dB keeps lora_b's strides
def test_torch_compile_fullgraph_forward_and_backward(b_layout):
    inputs = make_inputs(12, 32, 48, 4, 8, torch.float32, "cpu", "with_none", b_layout=b_layout)
    weight = torch.randn(48, 32)

    @torch.compile(fullgraph=True)
    def step(x, lora_a, lora_b, slot_ids, scales, ranks):
        plan = lora_ext.build_plan(slot_ids, lora_a.shape[0])
        y = lora_ext.linear_lora(x, weight, None, lora_a, lora_b, slot_ids, scales, ranks, plan)
        y = y + lora_ext.lora_delta(x, lora_a, lora_b, slot_ids, scales, ranks, plan)
        lora_ext.add_lora_(y, x, lora_a, lora_b, slot_ids, scales, ranks, plan)
        return (y * y).sum()

    leaves = Leaves(inputs)
    rest = (inputs["slot_ids"], inputs["scales"], inputs["ranks"])
    compiled = torch.autograd.grad(step(leaves.x, leaves.lora_a, leaves.lora_b, *rest), leaves.tensors())
    eager = torch.autograd.grad(step.__wrapped__(leaves.x, leaves.lora_a, leaves.lora_b, *rest), leaves.tensors())
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


# ---- CUDA: the same checks (skipped without a GPU) ---------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d_in,d_out,distribution", [
    (1, 4096, 4096, "one_slot"), (7, 3, 64, "with_none"), (64, 4096, 4096, "distinct"), (1037, 64, 4097, "unsorted"),
    (4096, 512, 1024, "sorted")])
def test_gradients_cuda(op, dtype, rows, d_in, d_out, distribution):
    inputs = make_inputs(rows, d_in, d_out, slots_for(distribution, rows), 16, dtype, "cuda", distribution,
                         seed=rows, b_layout="rank_major")
    weight, bias = base_layer(d_in, d_out, dtype)
    check_grads(op, inputs, f"cuda T={rows} {d_in}->{d_out} {distribution}", weight=weight.cuda(), bias=bias.cuda())


@pytest.mark.cuda
def test_a_bad_row_changes_no_other_slot_or_row_cuda():
    inputs = make_inputs(90, 64, 80, 6, 8, torch.float32, "cuda", "unsorted", seed=5, mixed_ranks=False,
                         b_layout="rank_major")
    g = upstream_grad((90, 80), torch.float32, "cuda")
    clean = op_grads("lora_delta", inputs, g)
    bad_slot = int(inputs["slot_ids"][17])
    g = g.clone()
    g[17, 3] = float("nan")
    dirty = op_grads("lora_delta", inputs, g)
    rows, slots = torch.arange(90, device="cuda") != 17, torch.arange(6, device="cuda") != bad_slot
    assert torch.equal(dirty[0][rows], clean[0][rows])
    assert torch.equal(dirty[1][slots], clean[1][slots]) and torch.equal(dirty[2][slots], clean[2][slots])
