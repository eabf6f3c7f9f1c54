"""The grouped LoRA ops: the public Python face of torch.ops.lora_ext.*.

Every op has one schema (csrc/lora_ops.cpp), a CPU and a CUDA kernel, a fake kernel here (for
torch.compile and meta tensors) and a pure-PyTorch reference (lora_ext/reference.py) that is
used when the native module is missing. The C++ ops check their arguments (csrc/lora_args.cpp);
the fake kernels only give the output shapes that torch.compile needs.
"""

import warnings

import torch

from lora_ext import reference
from lora_ext._native import native_available, native_error

__all__ = ["lora_delta", "add_lora_", "linear_lora", "build_plan", "plan_layout"]

_warned = False


def _use_native():
    global _warned
    if native_available():
        return True
    if not _warned:
        warnings.warn(f"lora_ext: native kernels unavailable ({native_error()}); using the slow "
                      "pure-PyTorch reference", RuntimeWarning, stacklevel=3)
        _warned = True
    return False


_DIRECT_DEVICES = ("cpu", "cuda")


def _takes_direct_call(x):
    """Whether to call the op's device kernel directly (lora_ext._C's entry points,
    csrc/direct_calls.cpp). When no gradient is wanted, going through torch.ops only parses and
    boxes the arguments (and for lora_delta and add_lora_ runs their Python autograd kernels,
    op_autograd.py), for nothing: paid by every patched layer of every serving step. Taken only for plain CPU or CUDA tensors with no
    dispatch mode active, and never while torch.compile traces."""
    return not (torch.is_grad_enabled() or type(x) is not torch.Tensor or torch.compiler.is_compiling()
                or torch._C._dispatch_tls_is_dispatch_key_included(torch._C.DispatchKey.Python)) \
        and x.device.type in _DIRECT_DEVICES


def lora_delta(x, lora_a, lora_b, slot_ids, scales=None, ranks=None, plan=None):
    """The LoRA delta of every row, each row with its own adapter slot.

    Semantics: out[t] = scales[s] * lora_b[s, :, :ranks[s]] @ (lora_a[s, :ranks[s], :] @ x[t]),
    s = slot_ids[t]; a zero row where s == -1. Accumulated in float32, returned in x's dtype.

    Args:
        x: (T, d_in) float32, float16 or bfloat16.
        lora_a: (S, R, d_in), x's dtype and device (PEFT lora_A.weight stacked over slots).
        lora_b: (S, d_out, R), x's dtype and device (PEFT lora_B.weight stacked over slots).
        slot_ids: (T,) int32 or int64, each -1 or in [0, S).
        scales: (S,) float32, or None for all 1.0.
        ranks: (S,) int32 or int64 in [0, R], or None for all R. Rows of lora_a and columns of
            lora_b at or beyond a slot's rank are never read.
        plan: optional build_plan(slot_ids, S), computed once and shared by many calls.
    Returns:
        (T, d_out) tensor in x's dtype.
    """
    if _use_native():
        if _takes_direct_call(x):
            return _C.lora_delta(x, lora_a, lora_b, slot_ids, scales, ranks, plan)
        return torch.ops.lora_ext.lora_delta(x, lora_a, lora_b, slot_ids, scales, ranks, plan)
    return reference.lora_delta_ref(x, lora_a, lora_b, slot_ids, scales, ranks)


def add_lora_(out, x, lora_a, lora_b, slot_ids, scales=None, ranks=None, plan=None):
    """out += lora_delta(x, ...) in place, summed in float32 and rounded once. out: (T, d_out)."""
    if _use_native():
        if _takes_direct_call(out):
            _C.add_lora_(out, x, lora_a, lora_b, slot_ids, scales, ranks, plan)  # bumps out's version
        else:
            torch.ops.lora_ext.add_lora_(out, x, lora_a, lora_b, slot_ids, scales, ranks, plan)
    else:
        reference.add_lora_ref(out, x, lora_a, lora_b, slot_ids, scales, ranks)
    return out


def linear_lora(x, weight, bias, lora_a, lora_b, slot_ids, scales=None, ranks=None, plan=None):
    """A linear layer and its rows' LoRA deltas: x @ weight.T + bias + lora_delta(x, ...).

    weight: (d_out, d_in) and bias: (d_out,) or None, in x's dtype (nn.Linear's parameters); the
    other arguments as in lora_delta. On CPU, decode batches (where
    lora_ext.kernel_config.linear_lora_fuses says so) run the base GEMM and the deltas in one
    parallel region (bfloat16 and float16 on the AMX tile unit where the CPU has it); other cases run ATen's
    linear, then add_lora_. The result is the same either way, up to float32 rounding of the sums.
    """
    if _use_native():
        if _takes_direct_call(x):
            return _C.linear_lora(x, weight, bias, lora_a, lora_b, slot_ids, scales, ranks, plan)
        return torch.ops.lora_ext.linear_lora(x, weight, bias, lora_a, lora_b, slot_ids, scales, ranks, plan)
    return reference.linear_lora_ref(x, weight, bias, lora_a, lora_b, slot_ids, scales, ranks)


def build_plan(slot_ids, num_slots):
    """Groups rows by slot once per forward pass: an int32 tensor every op call can reuse.

    On CUDA it is built on the device without host synchronization (safe in CUDA graphs). It
    stays valid while slot_ids keeps its values; rebuild it when they change. Without the native
    module the reference ignores plans, and this returns the slot ids as int32.
    """
    if _use_native():
        return torch.ops.lora_ext.build_plan(slot_ids, num_slots)
    return slot_ids.to(torch.int32)


def plan_layout(num_slots):
    """Where each part of a plan for `num_slots` slots starts, and the tile sizes (csrc/plan.h):
    {"offsets", "decode_tiles", "prefill_tiles", "order", "decode_tile_rows", "prefill_tile_rows"};
    a plan of T rows has order + T entries."""
    keys = ("offsets", "decode_tiles", "prefill_tiles", "order", "decode_tile_rows", "prefill_tile_rows")
    return dict(zip(keys, torch.ops.lora_ext.plan_layout(num_slots)))


if native_available():
    from lora_ext import _C, op_autograd

    op_autograd.register()

    @torch.library.register_fake("lora_ext::lora_delta")
    def _lora_delta_fake(x, lora_a, lora_b, slot_ids, scales=None, ranks=None, plan=None):
        return x.new_empty((x.shape[0], lora_b.shape[1]))

    @torch.library.register_fake("lora_ext::add_lora_")
    def _add_lora_fake(out, x, lora_a, lora_b, slot_ids, scales=None, ranks=None, plan=None):
        return None

    @torch.library.register_fake("lora_ext::linear_lora")
    def _linear_lora_fake(x, weight, bias, lora_a, lora_b, slot_ids, scales=None, ranks=None, plan=None):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("lora_ext::build_plan")
    def _build_plan_fake(slot_ids, num_slots):
        return slot_ids.new_empty((plan_layout(num_slots)["order"] + slot_ids.shape[0],), dtype=torch.int32)
