"""Gradients of the ops through autograd, and the same from the reference (float64, in the inputs'
dtype, and on absolute values), checked under the rule of tolerances.py row by row.

Rows of each gradient: dx by batch row; dA by (slot, rank) over d_in; dB by (slot, rank) over d_out
(dB transposed), so the rows that must be exactly zero are the rank rows beyond each slot's rank and
every rank row of a slot without rows in the batch.
"""

import torch

from helpers import assert_rows_match, zero_rows
from lora_ext import ops
from lora_ext.reference import linear_lora_ref, lora_delta_ref


class Leaves:
    """x, lora_a and lora_b as leaves that require grad; lora_b's leaf is the rank-major storage
    when the inputs pass a transposed view (as the model layer stores it)."""

    def __init__(self, inputs):
        self.x = inputs["x"].detach().clone().requires_grad_()
        self.lora_a = inputs["lora_a"].detach().clone().requires_grad_()
        b = inputs["lora_b"]
        self.rank_major = b.stride(1) == 1 and b.stride(2) != 1
        if self.rank_major:
            self.b_storage = b.detach().transpose(1, 2).clone().requires_grad_()
            self.lora_b = self.b_storage.transpose(1, 2)
        else:
            self.b_storage = b.detach().clone().requires_grad_()
            self.lora_b = self.b_storage

    def tensors(self):
        return self.x, self.lora_a, self.b_storage

    def grad_b_rank_rows(self, grad):
        """The gradient of lora_b as (S, R, d_out)."""
        return grad if self.rank_major else grad.transpose(1, 2)


def upstream_grad(shape, dtype, device, seed=11):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return g.to(device=device, dtype=dtype)


def op_grads(op, inputs, grad_out, weight=None, bias=None, out=None):
    """(dx, dA, dB as (S, R, d_out)) of one native op call through autograd."""
    leaves = Leaves(inputs)
    args = dict(slot_ids=inputs["slot_ids"], scales=inputs["scales"], ranks=inputs["ranks"])
    if op == "lora_delta":
        result = ops.lora_delta(leaves.x, leaves.lora_a, leaves.lora_b, **args)
    elif op == "linear_lora":
        result = ops.linear_lora(leaves.x, weight, bias, leaves.lora_a, leaves.lora_b, **args)
    else:
        result = out.clone()
        ops.add_lora_(result, leaves.x, leaves.lora_a, leaves.lora_b, **args)
    dx, da, db = torch.autograd.grad(result, leaves.tensors(), grad_out, allow_unused=True, materialize_grads=True)
    return dx, da, leaves.grad_b_rank_rows(db)


def reference_grads(op, inputs, grad_out, dtype, absolute=False, weight=None, bias=None):
    """The same gradients from the reference on CPU, computed in `dtype` (float64: the oracle; the
    inputs' dtype: PyTorch's own rounding), or on absolute values (the magnitude)."""
    cast = (lambda t: t.detach().cpu().to(dtype).abs()) if absolute else (lambda t: t.detach().cpu().to(dtype))
    x, a, b = (cast(inputs[k]).requires_grad_() for k in ("x", "lora_a", "lora_b"))
    scales = inputs["scales"].cpu().abs() if absolute and inputs["scales"] is not None else inputs["scales"]
    scales = scales.cpu() if scales is not None else None
    ranks = inputs["ranks"].cpu() if inputs["ranks"] is not None else None
    ids = inputs["slot_ids"].cpu()
    g = cast(grad_out)
    if op == "linear_lora":
        result = linear_lora_ref(x, cast(weight), None if bias is None else cast(bias), a, b, ids, scales, ranks,
                                 compute_dtype=dtype)
    else:  # add_lora_'s gradients with respect to x, A and B are lora_delta's
        result = lora_delta_ref(x, a, b, ids, scales, ranks, compute_dtype=dtype)
    if not result.requires_grad:  # no row touches an adapter: every gradient is zero
        return torch.zeros_like(x), torch.zeros_like(a), torch.zeros_like(b).transpose(1, 2)
    dx, da, db = torch.autograd.grad(result, (x, a, b), g, allow_unused=True, materialize_grads=True)
    return dx, da, db.transpose(1, 2)


def zero_weight_rows(inputs):
    """(S * R,) booleans: rank rows of dA / dB that must be exactly zero."""
    slots, max_rank = inputs["lora_a"].shape[:2]
    ids = inputs["slot_ids"].cpu().long()
    used = torch.zeros(slots, dtype=torch.bool)
    used[ids[ids >= 0]] = True
    ranks = inputs["ranks"].cpu().long() if inputs["ranks"] is not None else torch.full((slots,), max_rank)
    beyond = torch.arange(max_rank)[None, :] >= ranks[:, None]
    return (beyond | ~used[:, None]).reshape(-1)


def check_grads(op, inputs, label, weight=None, bias=None):
    """Every gradient of one op call against the reference under the rule of tolerances.py."""
    dtype, device = inputs["x"].dtype, inputs["x"].device
    d_out = inputs["lora_b"].shape[1]
    grad_out = upstream_grad((inputs["x"].shape[0], d_out), dtype, device)
    out = upstream_grad((inputs["x"].shape[0], d_out), dtype, device, seed=3) if op == "add_lora_" else None
    actual = op_grads(op, inputs, grad_out, weight, bias, out)
    expected = reference_grads(op, inputs, grad_out, torch.float64, weight=weight, bias=bias)
    pytorch = reference_grads(op, inputs, grad_out, dtype, weight=weight, bias=bias)
    magnitude = reference_grads(op, inputs, grad_out, torch.float64, absolute=True, weight=weight, bias=bias)
    weight_zero = zero_weight_rows(inputs)
    exact = (None if op == "linear_lora" else zero_rows(inputs), weight_zero, weight_zero)
    slots, max_rank = inputs["lora_a"].shape[:2]
    weight_row_slot = torch.arange(slots).repeat_interleave(max_rank)
    groups = (inputs["slot_ids"], weight_row_slot, weight_row_slot)  # rows computed the same way
    for name, got, exp, pt, mag, zero, group in zip(("dx", "dA", "dB"), actual, expected, pytorch, magnitude, exact,
                                                    groups):
        rows = (lambda t: t.reshape(-1, t.shape[-1])) if name != "dx" else (lambda t: t)
        assert_rows_match(rows(got), rows(exp), rows(pt), rows(mag), dtype, zero, f"{op} {name} {label}", groups=group)
    return actual
