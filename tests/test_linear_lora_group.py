"""linear_lora_group: the layers that read one x (q/k/v, gate/up) in one call. Each member's output
must be what linear_lora gives for that member alone (bit for bit: same arithmetic, same order)
and match the float64 reference under tolerances.py's rule, on the fused and unfused CPU paths."""

import pytest
import torch

import lora_ext
from lora_ext import kernel_config, ops
from helpers import DISTRIBUTIONS, make_inputs
from test_linear_lora import base_layer, yardsticks
from helpers import assert_rows_match

FUSED = {"fused": {}, "unfused": {"cpu_fused_linear": False}}
# q (wide), k and v (narrow, as with grouped-query attention), with and without a bias
MEMBER_OUTS = (96, 40, 40)


def group_inputs(rows, d_in, dtype, distribution, seed, device="cpu", slots=6, max_rank=16, outs=MEMBER_OUTS):
    """Per member: op inputs (own adapters, ranks and scales; x, slot ids shared), weight and bias."""
    members = []
    for i, d_out in enumerate(outs):
        inputs = make_inputs(rows, d_in, d_out, slots, max_rank, dtype, device, distribution, seed=seed + 7 * i,
                             b_layout="rank_major" if i % 2 else "peft")
        if members:
            inputs["x"], inputs["slot_ids"] = members[0][0]["x"], members[0][0]["slot_ids"]
        weight, bias = base_layer(d_in, d_out, i != 1, dtype, seed + i)
        members.append((inputs, weight.to(device), None if bias is None else bias.to(device)))
    return members


def run_group(members, plan=True):
    first = members[0][0]
    slots = first["lora_a"].shape[0]
    return ops.linear_lora_group(
        first["x"], [w for _, w, _ in members], [b for _, _, b in members], [m["lora_a"] for m, _, _ in members],
        [m["lora_b"] for m, _, _ in members], first["slot_ids"], [m["scales"] for m, _, _ in members],
        [m["ranks"] for m, _, _ in members], ops.build_plan(first["slot_ids"], slots) if plan else None)


def check_members(outs, members, dtype, label):
    assert len(outs) == len(members)
    for i, (out, (inputs, weight, bias)) in enumerate(zip(outs, members)):
        args = {k: v for k, v in inputs.items() if k != "x"}
        alone = lora_ext.linear_lora(inputs["x"], weight, bias, **args)
        assert out.dtype == dtype and out.shape == alone.shape
        assert torch.equal(out, alone), f"{label} member {i}: differs from linear_lora on that member alone"
        assert_rows_match(out, *yardsticks(inputs, weight, bias), dtype, what=f"linear_lora_group {label} member {i}")


@pytest.mark.parametrize("fusion", list(FUSED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [0, 1, 5, 32, 65, 200])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_members_match_linear_lora_and_the_reference(fusion, dtype, rows, distribution):
    members = group_inputs(rows, 72, dtype, distribution, seed=rows)
    with torch.no_grad(), kernel_config.configured(**FUSED[fusion]):
        outs = run_group(members)
        check_members(outs, members, dtype, f"{fusion} {dtype} T={rows} {distribution}")


def test_fused_group_runs_one_fused_region():
    """float32 decode: the members' base GEMMs and deltas in one fused call, not one per member."""
    members = group_inputs(32, 256, torch.float32, "distinct", seed=3)
    with torch.no_grad(), kernel_config.paths_taken() as taken:
        outs = run_group(members)
    if kernel_config.linear_lora_fuses(32, 256, torch.float32):
        assert taken.get("cpu_linear_fused") == 1 and "cpu_linear_unfused" not in taken, taken
    else:
        assert taken.get("cpu_linear_unfused") == 1, taken
    check_members(outs, members, torch.float32, "fused region")


def test_without_a_plan_and_with_one_member():
    members = group_inputs(9, 50, torch.float32, "with_none", seed=11)
    with torch.no_grad():
        check_members(run_group(members, plan=False), members, torch.float32, "no plan")
        check_members(run_group(members[:1]), members[:1], torch.float32, "one member")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_thread_count_gives_identical_results(threads):
    members = group_inputs(32, 300, torch.bfloat16, "distinct", seed=5, slots=40)
    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            single = run_group(members)
            torch.set_num_threads(threads)
            for out, alone in zip(run_group(members), single):
                assert torch.equal(out, alone)
    finally:
        torch.set_num_threads(before)


def _call(members, **change):
    first = members[0][0]
    args = dict(x=first["x"], weights=[w for _, w, _ in members], biases=[b for _, _, b in members],
                lora_a=[m["lora_a"] for m, _, _ in members], lora_b=[m["lora_b"] for m, _, _ in members],
                slot_ids=first["slot_ids"], scales=[m["scales"] for m, _, _ in members],
                ranks=[m["ranks"] for m, _, _ in members])
    args.update(change)
    return ops.linear_lora_group(**args)


def test_bad_lists_raise_clear_errors():
    members = group_inputs(8, 48, torch.float32, "unsorted", seed=2)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"3 weights but biases, lora_a, lora_b, scales and ranks have 3, 2, 3, "
                                               r"3 and 3 entries"):
            _call(members, lora_a=[m["lora_a"] for m, _, _ in members[:2]])
        with pytest.raises(RuntimeError, match=r"needs at least one member"):
            _call(members, weights=[], biases=[], lora_a=[], lora_b=[], scales=[], ranks=[])
        other = make_inputs(8, 48, 40, 9, 16, torch.float32, "cpu", seed=4)
        with pytest.raises(RuntimeError, match=r"member 2 has 9 adapter slots and member 0 has 6"):
            _call(members, lora_a=[*(m["lora_a"] for m, _, _ in members[:2]), other["lora_a"]],
                  lora_b=[*(m["lora_b"] for m, _, _ in members[:2]), other["lora_b"]],
                  scales=[*(m["scales"] for m, _, _ in members[:2]), other["scales"]],
                  ranks=[*(m["ranks"] for m, _, _ in members[:2]), other["ranks"]])
        with pytest.raises(ValueError, match=r"linear_lora_group \(member 1\).*lora_a"):
            _call(members, lora_a=[members[0][0]["lora_a"], members[1][0]["lora_a"][:, :, :47],
                                   members[2][0]["lora_a"]])


def test_refused_where_autograd_would_record_it():
    members = group_inputs(4, 24, torch.float32, "unsorted", seed=1)
    leaf = members[0][0]["lora_a"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="linear_lora_group has no gradient"):
        _call(members, lora_a=[leaf, members[1][0]["lora_a"], members[2][0]["lora_a"]])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 32, 300])
def test_matches_linear_lora_cuda(dtype, rows):
    members = group_inputs(rows, 96, dtype, "with_none", seed=rows, device="cuda")
    with torch.no_grad():
        check_members(run_group(members), members, dtype, f"cuda {dtype} T={rows}")
