"""Builds op inputs (with NaN beyond each slot's rank) and checks results against the reference."""

import math

import torch

from lora_ext.bench.distributions import DISTRIBUTIONS, slot_ids_for  # noqa: F401  (tests import DISTRIBUTIONS from here)
from lora_ext.reference import linear_lora_ref, lora_delta_ref
from tolerances import ACCUMULATION_FLOOR, FLOAT32_UNIT_ROUNDOFF, FLOOR, PYTORCH_ERROR_FACTOR, ROW_RTOL

def random_ranks(slots, max_rank, generator):
    """Mixed ranks covering 0, 1 and R whenever there are enough slots."""
    ranks = torch.randint(0, max_rank + 1, (slots,), generator=generator)
    for slot, rank in zip(range(slots), (max_rank, 1, 0)):
        ranks[slot] = rank
    return ranks


def make_inputs(rows, d_in, d_out, slots, max_rank, dtype, device, distribution="unsorted", seed=0,
                mixed_ranks=True, b_layout="peft", x_layout="contiguous", ids_dtype=torch.long):
    """Random op inputs; entries of lora_a / lora_b beyond each slot's rank are NaN.

    b_layout: "peft" stores lora_b as (S, d_out, R); "rank_major" stores (S, R, d_out) and passes a
    transposed view. x_layout: "contiguous", "strided" (every other column) or "transposed".
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d_in, generator=g)
    if x_layout == "strided":
        x = torch.randn(rows, 2 * d_in, generator=g)[:, ::2]
    elif x_layout == "transposed":
        x = torch.randn(d_in, rows, generator=g).t()
    lora_a = torch.randn(slots, max_rank, d_in, generator=g) / math.sqrt(d_in)
    lora_b = torch.randn(slots, d_out, max_rank, generator=g) / math.sqrt(max_rank)
    ranks = random_ranks(slots, max_rank, g) if mixed_ranks else None
    if ranks is not None:
        for slot, rank in enumerate(ranks.tolist()):
            lora_a[slot, rank:, :] = float("nan")
            lora_b[slot, :, rank:] = float("nan")
    scales = torch.rand(slots, generator=g) * 2 + 0.1
    ids = slot_ids_for(distribution, rows, slots, g).to(ids_dtype)
    x = x.to(device=device, dtype=dtype)
    lora_a = lora_a.to(device=device, dtype=dtype)
    if b_layout == "rank_major":
        lora_b = lora_b.transpose(1, 2).contiguous().to(device=device, dtype=dtype).transpose(1, 2)
    else:
        lora_b = lora_b.to(device=device, dtype=dtype)
    return dict(x=x, lora_a=lora_a, lora_b=lora_b, slot_ids=ids.to(device), scales=scales.to(device),
                ranks=None if ranks is None else ranks.to(device))


def _on_cpu(inputs):
    return {k: (v.cpu() if v is not None else None) for k, v in inputs.items()}


def reference64(inputs):
    """The float64 reference result of make_inputs' arguments (on CPU)."""
    cpu = _on_cpu(inputs)
    return lora_delta_ref(cpu["x"].double(), cpu["lora_a"].double(), cpu["lora_b"].double(),
                          cpu["slot_ids"], cpu["scales"], cpu["ranks"], compute_dtype=torch.float64)


def pytorch_delta(inputs):
    """lora_delta done by plain PyTorch on CPU in the inputs' dtype, the yardstick of tolerances.py:
    x @ A^T rounded to the dtype, @ B^T rounded again, times the scale rounded again."""
    cpu = _on_cpu(inputs)
    return lora_delta_ref(**cpu, compute_dtype=cpu["x"].dtype)


def pytorch_linear_lora(inputs, weight, bias):
    """linear_lora done by plain PyTorch on CPU in the inputs' dtype: F.linear in the dtype plus
    pytorch_delta, summed in the dtype."""
    cpu = _on_cpu(inputs)
    return linear_lora_ref(cpu.pop("x"), weight.cpu(), None if bias is None else bias.cpu(), **cpu,
                           compute_dtype=inputs["x"].dtype)


def magnitude64(inputs):
    """The reference computed on absolute values (|B| |A| |x|, scaled by |scale|): what float32
    accumulation errors are bounded by (a dot product's error grows with sum |a_i b_i|, not with
    |sum a_i b_i|); see ACCUMULATION_FLOOR in tolerances.py."""
    cpu = {k: (v.cpu() if v is not None else None) for k, v in inputs.items()}
    scales = cpu["scales"].abs() if cpu["scales"] is not None else None
    return lora_delta_ref(cpu["x"].double().abs(), cpu["lora_a"].double().abs(), cpu["lora_b"].double().abs(),
                          cpu["slot_ids"], scales, cpu["ranks"], compute_dtype=torch.float64)


def zero_rows(inputs):
    """Rows whose delta must be exactly zero: no adapter, or an adapter of rank 0."""
    ids = inputs["slot_ids"].cpu().long()
    zero = ids == -1
    if inputs["ranks"] is not None:
        ranks = inputs["ranks"].cpu()
        zero |= (ids >= 0) & (ranks[ids.clamp(min=0)] == 0)
    return zero


def row_errors(actual, expected, pytorch, magnitude):
    """Per row, in float64 on CPU: ||actual - expected||, ||pytorch - expected||, ||expected||, ||magnitude||."""
    expected = expected.cpu().double()
    return ((actual.detach().cpu().double() - expected).norm(dim=1),
            (pytorch.detach().cpu().double() - expected).norm(dim=1), expected.norm(dim=1),
            magnitude.cpu().double().norm(dim=1))


def pooled_pytorch_error(pytorch_err, mag, groups):
    """What PyTorch's rounding costs a row computed the same way: the largest ||pytorch - expected||
    / ||magnitude|| among the rows of the row's group (rows of one slot share A, B, scale and rank),
    times the row's ||magnitude|| (see tolerances.py: one row's own PyTorch error is one sample,
    which can be lucky)."""
    ratio = torch.where(mag > 0, pytorch_err / mag.clamp_min(1e-300), torch.zeros_like(mag))
    groups = groups.cpu().long()
    groups = groups - groups.min() if groups.numel() else groups
    worst = torch.zeros(int(groups.max()) + 1 if groups.numel() else 0, dtype=ratio.dtype)
    worst.scatter_reduce_(0, groups, ratio, reduce="amax")
    return worst[groups] * mag


def assert_rows_match(actual, expected, pytorch, magnitude, dtype, exact_zero_rows=None, what="result", groups=None):
    """The rule of tolerances.py, row by row: ||actual - expected|| <= min(PYTORCH_ERROR_FACTOR *
    max(||pytorch - expected||, pooled_pytorch_error over the row's group, when groups are given) + FLOOR[dtype] * ||expected|| + ACCUMULATION_FLOOR
    * 2^-24 * ||magnitude||, ROW_RTOL[dtype] * ||magnitude||), where expected is the float64 reference, pytorch the same math
    done by PyTorch in `dtype` and magnitude the reference on absolute values; listed rows exactly
    equal to expected (exactly zero deltas); NaN or infinity never passes."""
    assert actual.shape == expected.shape == pytorch.shape == magnitude.shape, \
        f"{what}: shapes {tuple(actual.shape)}, {tuple(expected.shape)}, {tuple(pytorch.shape)}, {tuple(magnitude.shape)} differ"
    host = actual.detach().cpu().double()
    assert not torch.isnan(host).any(), f"{what}: NaN in rows {torch.isnan(host).any(1).nonzero().flatten()[:10].tolist()}"
    assert torch.isfinite(expected).all() and torch.isfinite(pytorch).all(), f"{what}: the yardstick is not finite"
    if actual.numel() == 0:
        return
    err, pytorch_err, size, mag = row_errors(host, expected, pytorch, magnitude)
    if groups is not None:
        pytorch_err = torch.maximum(pytorch_err, pooled_pytorch_error(pytorch_err, mag, groups))
    rule = PYTORCH_ERROR_FACTOR * pytorch_err + FLOOR[dtype] * size + ACCUMULATION_FLOOR * FLOAT32_UNIT_ROUNDOFF * mag
    bound = torch.minimum(rule, ROW_RTOL[dtype] * mag)
    bad = ~(err <= bound)  # an infinite error fails too
    if bad.any():
        ratio = torch.where(bad, err / bound.clamp_min(1e-300), torch.zeros_like(err))
        row = int(ratio.argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {len(err)} rows off ({dtype}); worst row {row}: error {float(err[row]):.3g} "
            f"> min({PYTORCH_ERROR_FACTOR} x PyTorch's {float(pytorch_err[row]):.3g} + {FLOOR[dtype]:.3g} x ||expected|| "
            f"{float(size[row]):.3g} + {ACCUMULATION_FLOOR} x 2^-24 x ||magnitude|| {float(mag[row]):.3g}, {ROW_RTOL[dtype]} x "
            f"||magnitude||) (error / ||expected|| = {float(err[row] / size[row].clamp_min(1e-300)):.3g})")
    if exact_zero_rows is not None and exact_zero_rows.any():
        assert (host[exact_zero_rows] == expected.cpu().double()[exact_zero_rows]).all(), \
            f"{what}: rows that must be exact differ"


def delta_yardsticks(inputs):
    """What the rule of tolerances.py compares a delta with: reference64, pytorch_delta, magnitude64
    and zero_rows of the inputs (compute once, pass to both checks below)."""
    return reference64(inputs), pytorch_delta(inputs), magnitude64(inputs), zero_rows(inputs)


def check_lora_delta(delta, inputs, what="lora_delta", yardsticks=None):
    """lora_delta's result against the float64 reference under the rule of tolerances.py."""
    expected, pytorch, magnitude, exact = yardsticks or delta_yardsticks(inputs)
    assert_rows_match(delta, expected, pytorch, magnitude, inputs["x"].dtype, exact, what)


def check_add_lora(out, before, inputs, what="add_lora_", yardsticks=None):
    """add_lora_'s result (out, which held `before`) under the rule of tolerances.py; PyTorch's
    version adds pytorch_delta to `before` in the dtype."""
    expected, pytorch, magnitude, exact = yardsticks or delta_yardsticks(inputs)
    before = before.cpu()
    assert_rows_match(out, before.double() + expected, before + pytorch, before.double().abs() + magnitude,
                      inputs["x"].dtype, exact, what)
