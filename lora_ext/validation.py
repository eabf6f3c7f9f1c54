"""Argument checks of the op contract for the pure-PyTorch path (the C++ kernels check the same)."""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _require(cond, op, message):
    if not cond:
        raise ValueError(f"lora_ext: {op}: {message}")


def check_op_args(op, x, lora_a, lora_b, slot_ids, scales=None, ranks=None, out=None,
                  check_values=True, allow_float64=False):
    """Raises ValueError naming the argument and the values when the arguments break the contract.

    allow_float64: accept float64 data too (the reference computed in float64 is the test oracle).
    """
    _require(x.dim() == 2, op, f"x must be 2-D (T, d_in), but has shape {tuple(x.shape)}")
    _require(lora_a.dim() == 3, op, f"lora_a must be 3-D (S, R, d_in), but has shape {tuple(lora_a.shape)}")
    _require(lora_b.dim() == 3, op, f"lora_b must be 3-D (S, d_out, R), but has shape {tuple(lora_b.shape)}")
    _require(slot_ids.dim() == 1, op, f"slot_ids must be 1-D (T,), but has shape {tuple(slot_ids.shape)}")
    dtypes = FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    _require(x.dtype in dtypes, op, f"x must be float32, float16 or bfloat16, but is {x.dtype}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        _require(t.dtype == x.dtype, op, f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; they must match")
    _require(slot_ids.dtype in INDEX_DTYPES, op, f"slot_ids must be int32 or int64, but is {slot_ids.dtype}")
    named = [("lora_a", lora_a), ("lora_b", lora_b), ("slot_ids", slot_ids), ("scales", scales),
             ("ranks", ranks), ("out", out)]
    for name, t in named:
        if t is not None:
            _require(t.device == x.device, op, f"{name} is on {t.device} but x is on {x.device}; "
                     "all arguments must be on the same device")
    rows, d_in = x.shape
    slots, max_rank, a_in = lora_a.shape
    _require(d_in >= 1, op, f"x must have at least one column, but has shape {tuple(x.shape)}")
    _require(slots >= 1 and max_rank >= 1, op,
             f"lora_a must hold at least one slot of rank at least 1, but has shape {tuple(lora_a.shape)}")
    _require(a_in == d_in, op, f"lora_a has shape {tuple(lora_a.shape)} (S, R, d_in) but x has shape "
             f"{tuple(x.shape)} (T, d_in): d_in differs ({a_in} vs {d_in})")
    _require(lora_b.shape[0] == slots, op, f"lora_b has {lora_b.shape[0]} slots but lora_a has {slots}")
    _require(lora_b.shape[2] == max_rank, op, f"lora_b has shape {tuple(lora_b.shape)} (S, d_out, R) but "
             f"lora_a has shape {tuple(lora_a.shape)} (S, R, d_in): R differs ({lora_b.shape[2]} vs {max_rank})")
    _require(lora_b.shape[1] >= 1, op, f"lora_b must have d_out >= 1, but has shape {tuple(lora_b.shape)}")
    _require(slot_ids.shape[0] == rows, op, f"slot_ids has {slot_ids.shape[0]} entries but x has {rows} rows; "
             "there must be one slot id per row")
    if scales is not None:
        _require(tuple(scales.shape) == (slots,), op, f"scales must have shape (S,) = ({slots},), "
                 f"but has shape {tuple(scales.shape)}")
        _require(scales.dtype == torch.float32, op, f"scales must be float32, but is {scales.dtype}")
    if ranks is not None:
        _require(tuple(ranks.shape) == (slots,), op, f"ranks must have shape (S,) = ({slots},), "
                 f"but has shape {tuple(ranks.shape)}")
        _require(ranks.dtype in INDEX_DTYPES, op, f"ranks must be int32 or int64, but is {ranks.dtype}")
    if out is not None:
        d_out = lora_b.shape[1]
        _require(tuple(out.shape) == (rows, d_out), op, f"out must have shape (T, d_out) = ({rows}, {d_out}), "
                 f"but has shape {tuple(out.shape)}")
        _require(out.dtype == x.dtype, op, f"out has dtype {out.dtype} but x has dtype {x.dtype}; they must match")
    if check_values:
        _check_values(op, slot_ids, ranks, slots, max_rank)


def check_linear_args(x, weight, bias, lora_b):
    """linear_lora's base layer: weight (d_out, d_in) and bias (d_out,), x's dtype and device."""
    op = "linear_lora"
    d_out, d_in = lora_b.shape[1], x.shape[1]
    _require(weight.dim() == 2 and tuple(weight.shape) == (d_out, d_in), op,
             f"weight must have shape (d_out, d_in) = ({d_out}, {d_in}) to match x and lora_b, but has shape "
             f"{tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _require(t.dtype == x.dtype, op, f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; they must match")
        _require(t.device == x.device, op, f"{name} is on {t.device} but x is on {x.device}; "
                 "all arguments must be on the same device")
    if bias is not None:
        _require(tuple(bias.shape) == (d_out,), op, f"bias must have shape (d_out,) = ({d_out},), but has shape "
                 f"{tuple(bias.shape)}")


def check_slot_ids(op, slot_ids, slots):
    """Raises ValueError naming the first slot id outside [-1, slots)."""
    ids = slot_ids.to(torch.long)
    bad = ((ids < -1) | (ids >= slots)).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        raise ValueError(f"lora_ext: {op}: slot_ids[{row}] = {int(ids[row])} is out of range: slot ids must "
                         f"be -1 (no adapter) or in [0, {slots - 1}] for {slots} slots")


def _check_values(op, slot_ids, ranks, slots, max_rank):
    check_slot_ids(op, slot_ids, slots)
    if ranks is not None:
        rk = ranks.to(torch.long)
        bad = ((rk < 0) | (rk > max_rank)).nonzero()
        if bad.numel():
            slot = int(bad[0, 0])
            raise ValueError(f"lora_ext: {op}: ranks[{slot}] = {int(rk[slot])} is out of range: ranks must be "
                             f"in [0, R] = [0, {max_rank}]")
