"""The ops as PyTorch sees them: schemas, fake kernels (opcheck), torch.compile, the build report,
and which backends have kernels."""

import os

import pytest
import torch

import lora_ext
from helpers import assert_rows_match, magnitude64, make_inputs, pytorch_delta, pytorch_linear_lora, reference64
from lora_ext._native import has_kernel

OPS = ["lora_delta", "add_lora_", "linear_lora", "lora_backward", "build_plan"]


def test_native_module_loaded():
    assert lora_ext.native_available(), lora_ext.native_error()


def test_build_info_names_backends_and_build():
    info = lora_ext.build_info()
    assert info["native"] and "CPU" in info["backends"]
    assert info["build"] == "cpu only" or info["build"].startswith("cuda ")


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cpu_kernel(op):
    assert has_kernel(op, "CPU")


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cuda_kernel_when_built_with_cuda(op):
    if not lora_ext.build_info()["build"].startswith("cuda"):
        pytest.skip("built without CUDA")
    assert has_kernel(op, "CUDA"), f"lora_ext::{op} has no CUDA kernel although the build has CUDA"


def test_ci_requires_cuda_build_when_asked():
    """CI sets LORA_EXT_REQUIRE_CUDA_BUILD=1 where nvcc exists: the CUDA kernels must be in."""
    if os.environ.get("LORA_EXT_REQUIRE_CUDA_BUILD") != "1":
        pytest.skip("LORA_EXT_REQUIRE_CUDA_BUILD is not set")
    assert "CUDA" in lora_ext.build_info()["backends"]


def opcheck_devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", opcheck_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    inputs = make_inputs(9, 24, 40, 3, 8, dtype, device, "with_none")
    plan = lora_ext.build_plan(inputs["slot_ids"], 3)
    ordered = [inputs[k] for k in ("x", "lora_a", "lora_b", "slot_ids", "scales", "ranks")]
    torch.library.opcheck(torch.ops.lora_ext.lora_delta.default, (*ordered, None))
    torch.library.opcheck(torch.ops.lora_ext.lora_delta.default, (*ordered, plan))
    out = torch.randn(9, 40, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.lora_ext.add_lora_.default, (out, *ordered, plan))
    torch.library.opcheck(torch.ops.lora_ext.build_plan.default, (inputs["slot_ids"], 3))
    weight, bias = torch.randn(40, 24, device=device, dtype=dtype), torch.randn(40, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.lora_ext.linear_lora.default, (inputs["x"], weight, bias, *ordered[1:], plan))
    torch.library.opcheck(torch.ops.lora_ext.linear_lora.default, (inputs["x"], weight, None, *ordered[1:], None))


def test_torch_compile_fullgraph_cpu():
    inputs = make_inputs(12, 32, 48, 4, 8, torch.float32, "cpu", "with_none")

    @torch.compile(fullgraph=True)
    def layer(x, lora_a, lora_b, slot_ids, scales, ranks):
        plan = lora_ext.build_plan(slot_ids, lora_a.shape[0])
        base = x @ torch.ones(x.shape[1], lora_b.shape[1])
        lora_ext.add_lora_(base, x, lora_a, lora_b, slot_ids, scales, ranks, plan)
        return base + lora_ext.lora_delta(x, lora_a, lora_b, slot_ids, scales, ranks, plan)

    ones = torch.ones(32, 48, dtype=torch.float64)
    x = inputs["x"]
    expected = x.double() @ ones + 2 * reference64(inputs)
    pytorch = x @ ones.float() + 2 * pytorch_delta(inputs)
    magnitude = x.double().abs() @ ones + 2 * magnitude64(inputs)
    assert_rows_match(layer(**inputs), expected, pytorch, magnitude, torch.float32, what="compiled layer")


def test_torch_compile_fullgraph_linear_lora_cpu():
    inputs = make_inputs(12, 32, 48, 4, 8, torch.float32, "cpu", "with_none")
    weight = torch.randn(48, 32)

    @torch.compile(fullgraph=True)
    def layer(x, lora_a, lora_b, slot_ids, scales, ranks):
        plan = lora_ext.build_plan(slot_ids, lora_a.shape[0])
        return lora_ext.linear_lora(x, weight, None, lora_a, lora_b, slot_ids, scales, ranks, plan)

    expected = inputs["x"].double() @ weight.double().T + reference64(inputs)
    magnitude = inputs["x"].double().abs() @ weight.double().abs().T + magnitude64(inputs)
    assert_rows_match(layer(**inputs), expected, pytorch_linear_lora(inputs, weight, None), magnitude, torch.float32,
                      what="compiled linear_lora")


class _CountingEntryPoints:
    """Stands in for lora_ext._C in lora_ext.ops: counts the direct calls, then makes them."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            return getattr(self.module, name)(*args)
        return call


def test_calls_without_gradients_give_the_same_results_and_still_reach_dispatch_modes(monkeypatch):
    """Without autograd the wrappers call the device kernel directly (lora_ext._C's entry points,
    csrc/direct_calls.cpp; lora_ext/ops.py _takes_direct_call): bit for bit the results of the full
    dispatch, `out` marked modified as the Autograd kernel would, and a dispatch mode (profilers,
    FakeTensorMode, FLOP counters) still sees every call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lora_ext import ops

    entry_points = _CountingEntryPoints(ops._C)
    monkeypatch.setattr(ops, "_C", entry_points)

    inputs = make_inputs(11, 24, 40, 3, 8, torch.float32, "cpu", "with_none")
    args = [inputs[k] for k in ("lora_a", "lora_b", "slot_ids", "scales", "ranks")]
    x = inputs["x"]
    weight, bias = torch.randn(40, 24), torch.randn(40)
    out_full = torch.randn(11, 40)
    out_fast = out_full.clone()
    full = (lora_ext.lora_delta(x, *args), lora_ext.linear_lora(x, weight, bias, *args),
            lora_ext.add_lora_(out_full, x, *args))
    with torch.no_grad():
        version = out_fast._version
        fast = (lora_ext.lora_delta(x, *args), lora_ext.linear_lora(x, weight, bias, *args),
                lora_ext.add_lora_(out_fast, x, *args))
        assert out_fast._version > version
    assert entry_points.calls == ["lora_delta", "linear_lora", "add_lora_"]  # with gradients: none
    for a, b in zip(full, fast):
        assert torch.equal(a, b)

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Seen() as seen:
        lora_ext.lora_delta(x, *args)
        lora_ext.add_lora_(out_fast, x, *args)
        lora_ext.linear_lora(x, weight, bias, *args)
    assert [op for op in seen.ops if op.startswith("lora_ext")] == \
        ["lora_ext.lora_delta.default", "lora_ext.add_lora_.default", "lora_ext.linear_lora.default"]
    assert len(entry_points.calls) == 3  # under the mode: through torch.ops, not the entry points


def test_direct_entry_points_refuse_wrong_arguments():
    """lora_ext._C's entry points take exactly the op's positional arguments, tensors where the
    schema has tensors."""
    from lora_ext import _C

    inputs = make_inputs(4, 8, 6, 2, 4, torch.float32, "cpu", "with_none")
    args = [inputs[k] for k in ("x", "lora_a", "lora_b", "slot_ids", "scales", "ranks")]
    with pytest.raises(TypeError, match=r"lora_ext._C.lora_delta takes 7 positional arguments \(6 given\)"):
        _C.lora_delta(*args)
    with pytest.raises(TypeError, match=r"lora_ext._C.lora_delta: argument 1 must be a tensor, not list"):
        _C.lora_delta(args[0], [1.0], *args[2:], None)
    with pytest.raises(TypeError, match=r"argument 4 must be a tensor or None, not int"):
        _C.lora_delta(*args[:4], 3, args[5], None)
