"""Gradients of the native ops: lora_delta, add_lora_ and linear_lora differentiate with respect to
x, lora_a and lora_b (and linear_lora's weight and bias), through the grouped backward kernels of
the lora_backward op; slot_ids, scales, ranks and plan get no gradient.

For row t of slot s (rank r, scale c), with dy_t the gradient of the op's output:
    v_t = c B_s[:, :r]^T dy_t     dx_t = A_s[:r]^T v_t
    dA_s[:r] = sum over the slot's rows of v_t x_t^T     dB_s[:, :r] = sum of dy_t (c A_s[:r] x_t)^T
Gradient entries beyond a slot's rank and of slots without rows are exactly zero. A frozen base
(linear_lora's weight and bias not requiring grad) costs nothing: no gradient is computed for it.
The forward saves no intermediate: the backward recomputes u = c A x (csrc/cpu/lora_backward_cpu.cpp
says why).
"""

import torch

_DELTA_ARGS = ("x", "lora_a", "lora_b", "slot_ids", "scales", "ranks", "plan")
_NO_GRAD = (None,) * 4  # slot_ids, scales, ranks, plan


def lora_backward(grad_out, x, lora_a, lora_b, slot_ids, scales, ranks, plan, needs):
    """(dx, dA, dB) of the LoRA delta, each None unless `needs` (three booleans) asks for it."""
    if not any(needs):
        return None, None, None
    return torch.ops.lora_ext.lora_backward(grad_out, x, lora_a, lora_b, slot_ids, scales, ranks, plan,
                                            [bool(n) for n in needs])


def _save(ctx, tensors):
    ctx.save_for_backward(*tensors)


# ---- lora_delta ---------------------------------------------------------------------------------

def _lora_delta_setup(ctx, inputs, output):
    _save(ctx, inputs)


def _lora_delta_backward(ctx, grad):
    x, lora_a, lora_b, slot_ids, scales, ranks, plan = ctx.saved_tensors
    dx, da, db = lora_backward(grad, x, lora_a, lora_b, slot_ids, scales, ranks, plan, ctx.needs_input_grad[:3])
    return (dx, da, db) + _NO_GRAD


# ---- linear_lora ----------------------------------------------------------------------------------
# Its Autograd kernel is C++ (csrc/linear_lora_autograd.cpp), with the same formulas: the serving
# hot path, called from compiled graphs through the Autograd key, must not run Python there.


# ---- add_lora_ ------------------------------------------------------------------------------------
# add_lora_ mutates `out`, and torch.library.register_autograd takes only functional ops, so its
# Autograd kernel is written out: an autograd.Function that runs the op below autograd and marks
# `out` dirty, as in-place ATen ops do (the gradient passes to the old `out` unchanged).

class _AddLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keyset, out, x, lora_a, lora_b, slot_ids, scales, ranks, plan):
        below = keyset & torch._C._after_autograd_keyset
        torch.ops.lora_ext.add_lora_.default.redispatch(below, out, x, lora_a, lora_b, slot_ids, scales, ranks, plan)
        ctx.mark_dirty(out)
        _save(ctx, (x, lora_a, lora_b, slot_ids, scales, ranks, plan))
        return out

    @staticmethod
    def backward(ctx, grad):
        x, lora_a, lora_b, slot_ids, scales, ranks, plan = ctx.saved_tensors
        dx, da, db = lora_backward(grad, x, lora_a, lora_b, slot_ids, scales, ranks, plan, ctx.needs_input_grad[2:5])
        return (None, grad if ctx.needs_input_grad[1] else None, dx, da, db) + _NO_GRAD


def _add_lora_autograd(keyset, out, x, lora_a, lora_b, slot_ids, scales=None, ranks=None, plan=None):
    _AddLora.apply(keyset, out, x, lora_a, lora_b, slot_ids, scales, ranks, plan)


_library = None


def register():
    """Registers the gradients (once, when the native module has loaded)."""
    global _library
    if _library is not None:
        return
    torch.library.register_autograd("lora_ext::lora_delta", _lora_delta_backward, setup_context=_lora_delta_setup)
    _library = torch.library.Library("lora_ext", "IMPL")
    _library.impl("add_lora_", _add_lora_autograd, "Autograd", with_keyset=True)

    @torch.library.register_fake("lora_ext::lora_backward")
    def _lora_backward_fake(grad_out, x, lora_a, lora_b, slot_ids, scales, ranks, plan, output_mask):
        # as the kernels allocate them: dx contiguous, dA and dB with their weights' strides (a
        # rank-major lora_b's gradient is rank-major too)
        made = (x.new_empty(x.shape), torch.empty_like(lora_a), torch.empty_like(lora_b))
        return tuple(t if need else None for t, need in zip(made, output_mask))
