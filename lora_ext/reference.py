"""The pure-PyTorch reference of the op contract: the test oracle and the fallback backend.

Semantics, for row t with s = slot_ids[t] and r = ranks[s]:
    out[t] = scales[s] * lora_b[s, :, :r] @ (lora_a[s, :r, :] @ x[t])     (zero where s == -1)
accumulated in `compute_dtype` (float32 by default; tests use float64) and returned in x's dtype.
Rows of lora_a and columns of lora_b at or beyond a slot's rank are never read.

This is the math only: the argument checks of the contract live in the C++ ops (csrc/lora_args.cpp),
so the fallback (used when the native module cannot load) computes valid inputs correctly and
leaves invalid ones to whatever PyTorch raises.
"""

import torch


def lora_delta_ref(x, lora_a, lora_b, slot_ids, scales=None, ranks=None, *,
                   compute_dtype=torch.float32, out_dtype=None):
    """(T, d_out) LoRA delta of every row; see the module docstring for the math."""
    rows, d_out, max_rank = x.shape[0], lora_b.shape[1], lora_a.shape[1]
    out = torch.zeros(rows, d_out, dtype=compute_dtype, device=x.device)
    ids = slot_ids.to(torch.long)
    for slot in torch.unique(ids[ids >= 0]).tolist():
        rank = int(ranks[slot]) if ranks is not None else max_rank
        if rank == 0:
            continue
        rows_of_slot = (ids == slot).nonzero().squeeze(1)
        a = lora_a[slot, :rank, :].to(compute_dtype)
        b = lora_b[slot, :, :rank].to(compute_dtype)
        u = x[rows_of_slot].to(compute_dtype) @ a.T
        scale = float(scales[slot]) if scales is not None else 1.0
        out[rows_of_slot] = scale * (u @ b.T)
    return out.to(out_dtype or x.dtype)


def add_lora_ref(out, x, lora_a, lora_b, slot_ids, scales=None, ranks=None):
    """out += lora_delta(...), summed in float32 and rounded once to out's dtype."""
    delta = lora_delta_ref(x, lora_a, lora_b, slot_ids, scales, ranks, out_dtype=torch.float32)
    out.copy_(out.float() + delta)


def linear_lora_ref(x, weight, bias, lora_a, lora_b, slot_ids, scales=None, ranks=None, *,
                    compute_dtype=torch.float32):
    """x @ weight.T + bias + lora_delta(x, ...), summed in `compute_dtype` and returned in x's dtype."""
    base = torch.nn.functional.linear(x.to(compute_dtype), weight.to(compute_dtype),
                                      None if bias is None else bias.to(compute_dtype))
    delta = lora_delta_ref(x, lora_a, lora_b, slot_ids, scales, ranks, compute_dtype=compute_dtype,
                           out_dtype=compute_dtype)
    return (base + delta).to(x.dtype)
