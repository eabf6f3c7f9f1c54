"""Every contract violation raises ValueError naming the argument and the values, and leaves the
output untouched."""

import pytest
import torch

import lora_ext


def args(**overrides):
    g = torch.Generator().manual_seed(0)
    base = dict(
        x=torch.randn(6, 32, generator=g),
        lora_a=torch.randn(4, 8, 32, generator=g),
        lora_b=torch.randn(4, 48, 8, generator=g),
        slot_ids=torch.tensor([0, 1, -1, 3, 2, 0]),
        scales=torch.ones(4),
        ranks=torch.tensor([8, 4, 0, 1]),
    )
    base.update(overrides)
    return base


BAD_CASES = {
    "x 3-D": (dict(x=torch.randn(2, 6, 32)), r"x must be 2-D \(T, d_in\), but has shape"),
    "lora_a 2-D": (dict(lora_a=torch.randn(8, 32)), r"lora_a must be 3-D \(S, R, d_in\)"),
    "lora_b 2-D": (dict(lora_b=torch.randn(48, 8)), r"lora_b must be 3-D \(S, d_out, R\)"),
    "x float64": (dict(x=torch.randn(6, 32, dtype=torch.float64)), r"x must be float32, float16 or bfloat16, but is"),
    "lora_a dtype": (dict(lora_a=torch.randn(4, 8, 32).half()), r"lora_a has dtype \S+ but x has dtype \S+; they must match"),
    "lora_b dtype": (dict(lora_b=torch.randn(4, 48, 8).bfloat16()), r"lora_b has dtype \S+ but x has dtype"),
    "ids float": (dict(slot_ids=torch.zeros(6)), r"slot_ids must be int32 or int64, but is"),
    "d_in differs": (dict(lora_a=torch.randn(4, 8, 31)), r"d_in differs \(31 vs 32\)"),
    "slots differ": (dict(lora_b=torch.randn(3, 48, 8)), r"lora_b has 3 slots but lora_a has 4"),
    "rank differs": (dict(lora_b=torch.randn(4, 48, 7)), r"R differs \(7 vs 8\)"),
    "ids length": (dict(slot_ids=torch.zeros(5, dtype=torch.long)), r"slot_ids has 5 entries but x has 6 rows"),
    "id below -1": (dict(slot_ids=torch.tensor([0, 1, -2, 3, 2, 0])), r"slot_ids\[2\] = -2 is out of range.*\[0, 3\] for 4 slots"),
    "id at S": (dict(slot_ids=torch.tensor([0, 1, -1, 4, 2, 0])), r"slot_ids\[3\] = 4 is out of range"),
    "rank above R": (dict(ranks=torch.tensor([8, 9, 0, 1])), r"ranks\[1\] = 9 is out of range: ranks must be in \[0, R\] = \[0, 8\]"),
    "rank negative": (dict(ranks=torch.tensor([8, 4, -1, 1])), r"ranks\[2\] = -1 is out of range"),
    "ranks shape": (dict(ranks=torch.tensor([8, 4, 0])), r"ranks must have shape \(S,\) = \(4,\), but has shape"),
    "ranks float": (dict(ranks=torch.ones(4)), r"ranks must be int32 or int64"),
    "scales shape": (dict(scales=torch.ones(5)), r"scales must have shape \(S,\) = \(4,\)"),
    "scales dtype": (dict(scales=torch.ones(4, dtype=torch.float64)), r"scales must be float32, but is"),
    "no columns": (dict(x=torch.randn(6, 0), lora_a=torch.randn(4, 8, 0)), r"x must have at least one column"),
    "no slots": (dict(lora_a=torch.randn(0, 8, 32), lora_b=torch.randn(0, 48, 8), scales=None, ranks=None),
                 r"at least one slot of rank at least 1"),
}


def test_cpu_kernel_refuses_arguments_on_another_device():
    """The device check, on a machine with no second real device: the CPU kernel called directly
    (a call that mixes in meta tensors otherwise goes to the fake kernel, which only infers shapes)."""
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    a = args(lora_b=torch.randn(4, 48, 8, device="meta"))
    with pytest.raises(ValueError, match=r"lora_b is on meta but x is on cpu; all arguments must be on the same device"):
        torch.ops.lora_ext.lora_delta.default.redispatch(cpu, a["x"], a["lora_a"], a["lora_b"], a["slot_ids"],
                                                         a["scales"], a["ranks"], None)


@pytest.mark.cuda
def test_arguments_on_two_devices_refused():
    a = args()
    a = {k: v.cuda() for k, v in a.items()}
    a["lora_b"] = a["lora_b"].cpu()
    with pytest.raises(ValueError, match=r"lora_b is on cpu but x is on cuda:0"):
        lora_ext.lora_delta(**a)


# With gradients the ops go through torch.ops; without, the wrappers call lora_ext._C's direct
# entry points (csrc/direct_calls.cpp): both must refuse with the same error.
GRAD_MODES = [pytest.param(True, id="grad"), pytest.param(False, id="no_grad")]


@pytest.mark.parametrize("grad", GRAD_MODES)
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_lora_delta_refuses(case, grad):
    overrides, pattern = BAD_CASES[case]
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=pattern):
        lora_ext.lora_delta(**args(**overrides))


@pytest.mark.parametrize("grad", GRAD_MODES)
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_add_lora_refuses_and_leaves_out_untouched(case, grad):
    overrides, pattern = BAD_CASES[case]
    out = torch.randn(6, 48)
    before = out.clone()
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=pattern):
        lora_ext.add_lora_(out, **args(**overrides))
    assert torch.equal(out, before)


@pytest.mark.parametrize("out,pattern", [
    (torch.zeros(6, 47), r"out must have shape \(T, d_out\) = \(6, 48\), but has shape"),
    (torch.zeros(6, 48, dtype=torch.float16), r"out has dtype \S+ but x has dtype"),
])
def test_add_lora_refuses_bad_out(out, pattern):
    with pytest.raises(ValueError, match=pattern):
        lora_ext.add_lora_(out, **args())


def test_plan_of_other_shape_refused():
    plan = lora_ext.build_plan(torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match=r"plan must be the int32 tensor that build_plan\(slot_ids, 4\) returns"):
        lora_ext.lora_delta(**args(), plan=plan)


@pytest.mark.parametrize("ids,slots,pattern", [
    (torch.tensor([0, 5]), 5, r"slot_ids\[1\] = 5 is out of range"),
    (torch.tensor([0, 1]), 0, r"num_slots must be at least 1"),
    (torch.zeros(2, 2, dtype=torch.long), 3, r"slot_ids must be 1-D"),
])
def test_build_plan_refuses(ids, slots, pattern):
    with pytest.raises(ValueError, match=pattern):
        lora_ext.build_plan(ids, slots)
