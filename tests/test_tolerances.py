"""The tolerance rule of tolerances.py catches wrong kernels: each op, made wrong on purpose
(delta scaled by 0.95, each adapter's last rank dropped, one row's delta dropped), fails the very
checks the op tests use, in every dtype, at small sizes and 4097 wide; the real ops pass the same
inputs, so the rule is neither too loose nor too tight there."""

import inspect

import pytest
import torch

import lora_ext
import test_linear_lora
import test_ops
from helpers import make_inputs
from kernel_paths import HAS_AMX_BF16

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [(67, 130), (64, 1), (4097, 64), (64, 4097)]  # (d_in, d_out)
OPS = ["lora_delta", "add_lora_", "linear_lora"]
REAL = {op: getattr(lora_ext, op) for op in OPS}


def scaled(args):
    """Every delta times 0.95."""
    args["scales"] = args["scales"] * 0.95


def rank_missing(args):
    """Every adapter one rank short (clamped at 0)."""
    args["ranks"] = (args["ranks"] - 1).clamp(min=0)


def row_missing(args):
    """The delta of the first row that has one (an adapter of rank > 0) missing."""
    ids = args["slot_ids"].clone()
    has_delta = (ids >= 0) & (args["ranks"][ids.clamp(min=0)] > 0)
    ids[int(has_delta.nonzero()[0])] = -1
    args["slot_ids"] = ids


MUTATIONS = {"scaled_0.95": scaled, "rank_missing": rank_missing, "row_missing": row_missing}


def mutated(op, mutation):
    """The real op, called with arguments changed by `mutation`."""
    real = REAL[op]
    signature = inspect.signature(real)

    def wrong(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        MUTATIONS[mutation](bound.arguments)
        return real(*bound.args, **bound.kwargs)

    return wrong


def run_checks(op, dtype, d_in, d_out):
    """The op tests' own checks: run_both_ops of test_ops, check of test_linear_lora."""
    inputs = make_inputs(24, d_in, d_out, 5, 16, dtype, "cpu", "unsorted", seed=d_in + d_out)
    if op == "linear_lora":
        weight, bias = test_linear_lora.base_layer(d_in, d_out, True, dtype, seed=d_in)
        test_linear_lora.check(inputs, weight, bias, dtype, "mutation test")
    else:
        test_ops.run_both_ops(inputs, dtype, "mutation test")


def size_id(size):
    return f"{size[0]}x{size[1]}"


@pytest.mark.parametrize("size", SIZES, ids=size_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("op", ["lora_delta", "linear_lora"])  # run_both_ops checks add_lora_ as well
def test_real_ops_pass(op, dtype, size):
    run_checks(op, dtype, *size)


@pytest.mark.parametrize("size", SIZES, ids=size_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("op", OPS)
def test_wrong_op_fails(monkeypatch, op, mutation, dtype, size):
    monkeypatch.setattr(lora_ext, op, mutated(op, mutation))
    with pytest.raises(AssertionError, match=f"^{op} mutation test: .* rows off"):
        run_checks(op, dtype, *size)


# ---- gradients: the backward made wrong on purpose must fail check_grads --------------------------

def wrong_backward(mutation):
    """lora_backward (what every op's autograd calls) made wrong: every gradient times 0.95, each
    adapter's last rank dropped, or one row's gradients dropped (that row as if it had no adapter)."""
    from lora_ext import op_autograd

    real = op_autograd.lora_backward

    def wrong(grad_out, x, lora_a, lora_b, slot_ids, scales, ranks, plan, needs):
        args = dict(slot_ids=slot_ids, scales=scales, ranks=ranks)
        MUTATIONS[mutation](args)
        return real(grad_out, x, lora_a, lora_b, args["slot_ids"], args["scales"], args["ranks"], None, needs)
    return wrong


@pytest.mark.parametrize("d_in,d_out", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_wrong_gradient_fails(monkeypatch, mutation, dtype, d_in, d_out):
    from grad_helpers import check_grads
    from lora_ext import op_autograd

    inputs = make_inputs(24, d_in, d_out, 5, 16, dtype, "cpu", "unsorted", seed=d_in + d_out, b_layout="rank_major")
    check_grads("lora_delta", inputs, "real backward")  # the real kernels pass these inputs
    monkeypatch.setattr(op_autograd, "lora_backward", wrong_backward(mutation))
    with pytest.raises(AssertionError, match="rows off|must be exact"):
        check_grads("lora_delta", inputs, f"wrong backward ({mutation})")


# ---- bfloat16 segments on the AMX tile unit (every slot a GEMM segment) ----------------------------

@pytest.mark.skipif(not HAS_AMX_BF16, reason="the AMX deltas need a CPU with AMX-BF16")
@pytest.mark.parametrize("size", SIZES, ids=size_id)
@pytest.mark.parametrize("mutation", [None] + list(MUTATIONS))
def test_amx_segment_results_are_held_to_the_rule(monkeypatch, mutation, size):
    """The results of amx_deltas.h pass the op checks as they are, and fail them made wrong."""
    with lora_ext.kernel_config.configured(cpu_gemm_min_rows=1), lora_ext.kernel_config.paths_taken() as taken:
        if mutation is None:
            run_checks("lora_delta", torch.bfloat16, *size)
        else:
            monkeypatch.setattr(lora_ext, "lora_delta", mutated("lora_delta", mutation))
            with pytest.raises(AssertionError, match="^lora_delta mutation test: .* rows off"):
                run_checks("lora_delta", torch.bfloat16, *size)
    assert taken.get("cpu_gemm_amx", 0) >= 1, taken
