"""The pure-PyTorch reference of the op contract: the test oracle and the fallback backend.

Semantics, for row t with s = slot_ids[t] and r = ranks[s]:
    out[t] = scales[s] * lora_b[s, :, :r] @ (lora_a[s, :r, :] @ x[t])     (zero where s == -1)
accumulated in `compute_dtype` (float32 by default; tests use float64) and returned in x's dtype.
Rows of lora_a and columns of lora_b at or beyond a slot's rank are never read.
"""

import torch

from lora_ext.validation import check_linear_args, check_op_args, check_slot_ids


def lora_delta_ref(x, lora_a, lora_b, slot_ids, scales=None, ranks=None, *,
                   compute_dtype=torch.float32, out_dtype=None):
    """(T, d_out) LoRA delta of every row; see the module docstring for the math."""
    check_op_args("lora_delta", x, lora_a, lora_b, slot_ids, scales, ranks, allow_float64=True)
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
    check_op_args("add_lora_", x, lora_a, lora_b, slot_ids, scales, ranks, out=out, allow_float64=True)
    delta = lora_delta_ref(x, lora_a, lora_b, slot_ids, scales, ranks, out_dtype=torch.float32)
    out.copy_(out.float() + delta)


def linear_lora_ref(x, weight, bias, lora_a, lora_b, slot_ids, scales=None, ranks=None, *,
                    compute_dtype=torch.float32):
    """x @ weight.T + bias + lora_delta(x, ...), summed in `compute_dtype` and returned in x's dtype."""
    check_op_args("linear_lora", x, lora_a, lora_b, slot_ids, scales, ranks, allow_float64=True)
    check_linear_args(x, weight, bias, lora_b)
    base = torch.nn.functional.linear(x.to(compute_dtype), weight.to(compute_dtype),
                                      None if bias is None else bias.to(compute_dtype))
    delta = lora_delta_ref(x, lora_a, lora_b, slot_ids, scales, ranks, compute_dtype=compute_dtype,
                           out_dtype=compute_dtype)
    return (base + delta).to(x.dtype)


DECODE_TILE_ROWS = 4    # csrc/plan.h kDecodeTileRows
PREFILL_TILE_ROWS = 64  # csrc/plan.h kPrefillTileRows


def plan_size(num_rows, num_slots):
    """Entries of the int32 plan tensor for T rows and S slots (layout in csrc/plan.h)."""
    return 2 + 3 * (num_slots + 3) + num_rows


def build_plan_ref(slot_ids, num_slots):
    """The batch plan of csrc/plan.h, built in Python: rows grouped by slot, stable."""
    if num_slots < 1:
        raise ValueError(f"lora_ext: build_plan: num_slots must be at least 1, but is {num_slots}")
    ids = slot_ids.to(torch.long).cpu()
    check_slot_ids("build_plan", ids, num_slots)
    bins = torch.where(ids == -1, torch.full_like(ids, num_slots), ids)
    counts = torch.bincount(bins, minlength=num_slots + 2)

    def prefix(values):
        return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(values, 0)])

    order = torch.sort(bins, stable=True).indices
    header = torch.tensor([ids.numel(), num_slots])
    parts = [header, prefix(counts), prefix((counts + DECODE_TILE_ROWS - 1) // DECODE_TILE_ROWS),
             prefix((counts + PREFILL_TILE_ROWS - 1) // PREFILL_TILE_ROWS), order]
    return torch.cat(parts).to(torch.int32).to(slot_ids.device)
