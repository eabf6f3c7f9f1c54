"""Tensor-parallel models: layers whose weights transformers sharded over ranks (tp_plan="auto",
weights as DTensor shards), and the adapter layout that adds no collective to them.

A column-parallel layer ("colwise": weight Shard(0), each rank computes a slice of the output
features) keeps A whole and only its slice of B's rows; the layer's output stays this rank's slice.
A row-parallel layer ("rowwise": weight Shard(1), each rank holds a slice of the input features)
keeps its slice of A's columns and B whole: the rank's partial output x_r W_r^T + s B (A_r x_r) is
summed by the one all-reduce the base layer needs anyway, then the (replicated) bias is added.
The local compute is the grouped kernels on plain local tensors, as on one device.

Under autograd the same two collectives carry the gradients, as Megatron-LM's tensor parallelism
does: a column-parallel layer's input gradient is partial on each rank (summed by an all-reduce in
backward, the one the base layer's own input gradient needs), and the row-parallel all-reduce passes
its output gradient through unchanged. The replicated adapter halves (A of a column-parallel
layer, B of a row-parallel one) get a partial gradient on each rank, which a hook on the leaf sums
over the ranks.
"""

import re
import zlib
from dataclasses import dataclass

import torch

COLWISE, ROWWISE = "colwise", "rowwise"


@dataclass(frozen=True)
class Sharding:
    """How one patched layer is split over the tensor-parallel ranks, and this rank's part.

    style: COLWISE (output features split) or ROWWISE (input features split); full_in and full_out:
    the whole layer's features (what adapter files hold); start:stop: this rank's features along
    the split dimension."""

    style: str
    group: object
    world_size: int
    rank: int
    full_in: int
    full_out: int
    start: int
    stop: int

    def shard(self, lora_a, lora_b):
        """This rank's (A (r, d_in), B (d_out, r)) of a whole adapter module's weights, as copies
        (a slice would keep the whole tensor alive)."""
        if self.style == COLWISE:
            return lora_a, lora_b[self.start:self.stop].clone()
        return lora_a[:, self.start:self.stop].clone(), lora_b

    def gather(self, lora_a, lora_b):
        """The whole (A, B) from every rank's part: a collective, every rank calls it."""
        if self.style == COLWISE:
            return lora_a, self._gather(lora_b, 0, self.full_out)
        return self._gather(lora_a, 1, self.full_in), lora_b

    def _gather(self, part, dim, whole):
        # every rank sends a piece of the even-split size; only the last non-empty one is padded
        chunk = -(-whole // self.world_size)
        pad = [0, 0] * (part.dim() - 1 - dim) + [0, chunk - part.shape[dim]]
        piece = torch.nn.functional.pad(part.detach(), pad).contiguous()
        pieces = [torch.empty_like(piece) for _ in range(self.world_size)]
        torch.distributed.all_gather(pieces, piece, group=self.group)
        return torch.cat(pieces, dim).narrow(dim, 0, whole)

    def sum_replicated_grads(self, a_leaf, b_leaf):
        """Makes the replicated half of a trainable module (A of a column-parallel layer, B of a
        row-parallel one) receive the sum over ranks of its partial gradients."""
        replicated = a_leaf if self.style == COLWISE else b_leaf
        replicated.register_hook(lambda grad: _all_reduced(grad, self.group))

    def forward(self, layer, batch, x):
        """The patched layer's output on this rank for a batch with adapters: colwise, this rank's
        output features; rowwise, the whole output (summed over ranks, bias added once)."""
        base = layer.base_layer
        weight = base.weight.to_local()
        bias = None if base.bias is None else base.bias.to_local()
        if self.style == COLWISE:
            if torch.is_grad_enabled() and x.requires_grad:
                x = _SumGradOverRanks.apply(x, self.group)
            return layer.lora_forward(batch, x, weight, bias, True,
                                      lambda: torch.nn.functional.linear(x, weight, bias))
        partial = layer.lora_forward(batch, x, weight, None, True, lambda: torch.nn.functional.linear(x, weight))
        if torch.is_grad_enabled() and partial.requires_grad:
            out = _SumOverRanks.apply(partial, self.group)
        else:
            torch.distributed.all_reduce(partial, group=self.group)
            out = partial
        return out if bias is None else out + bias


def _all_reduced(tensor, group):
    tensor = tensor.clone()
    torch.distributed.all_reduce(tensor, group=group)
    return tensor


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum over ranks of each rank's partial output. Backward: the output gradient,
    already the same on every rank, passes through."""

    @staticmethod
    def forward(ctx, partial, group):
        return _all_reduced(partial, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumGradOverRanks(torch.autograd.Function):
    """Forward: the (replicated) input unchanged. Backward: the sum over ranks of each rank's
    partial input gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduced(grad, ctx.group), None


def _plan_style(model, name):
    """The tp_plan style transformers applied to module `name` (plan keys use * for layer numbers)."""
    plan = getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None) or {}
    return plan.get(name, plan.get(re.sub(r"\.\d+(?=\.|$)", ".*", name)))


def sharding_of(model, name, module):
    """The Sharding of patched module `name`, None if its weight is not a DTensor; raises a
    ValueError naming the module, its style and placements for a layout lora_ext does not know."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor, Replicate, Shard

    weight = module.weight
    if not isinstance(weight, DTensor):
        return None
    style = _plan_style(model, name)
    placements = tuple(weight.placements)
    bias = getattr(module, "bias", None)
    bias_placements = tuple(bias.placements) if isinstance(bias, DTensor) else None
    known = {COLWISE: ((Shard(0),), (None, (Shard(0),))), ROWWISE: ((Shard(1),), (None, (Replicate(),)))}
    if (type(module) is not torch.nn.Linear or style not in known or placements != known[style][0]
            or bias_placements not in known[style][1] or weight.device_mesh.ndim != 1):
        raise ValueError(
            f"lora_ext: module {name!r} ({type(module).__name__}) is tensor-parallel with style {style!r}, weight "
            f"placements {placements} and bias placements {bias_placements} on a {weight.device_mesh.ndim}-D mesh; "
            "lora_ext supports nn.Linear layers sharded 'colwise' (weight Shard(0)) or 'rowwise' (weight Shard(1), "
            "bias replicated) on a 1-D mesh; leave this module out of target_modules")
    mesh = weight.device_mesh
    world_size, rank = mesh.size(), mesh.get_local_rank()
    full_out, full_in = weight.shape
    dim = 0 if style == COLWISE else 1
    whole, local = weight.shape[dim], weight.to_local().shape[dim]
    chunk = -(-whole // world_size)  # DTensor's Shard splits as torch.chunk does
    start = min(rank * chunk, whole)
    stop = min(start + chunk, whole)
    if stop - start != local:
        raise ValueError(f"lora_ext: module {name!r}: rank {rank} of {world_size} holds {local} of its {whole} "
                         f"{'output' if dim == 0 else 'input'} features, not the {stop - start} an even split gives")
    return Sharding(style, mesh.get_group(), world_size, rank, full_in, full_out, start, stop)


def check_same_batch(group, names, device, failed=False):
    """One all-reduce of three integers: raises a ValueError on every rank if the ranks were given
    different adapter names for a batch (each rank must run the same batch), or, on the other
    ranks, if one of them `failed` to prepare it (that one raises its own error)."""
    digest = zlib.crc32(repr(names).encode())
    flags = torch.tensor([digest, -digest, int(failed)], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=group)
    world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    if flags[0].item() != -flags[1].item():
        raise ValueError(f"lora_ext: the {world} tensor-parallel ranks were given different adapter names for this "
                         f"batch (rank {rank}: {short_names(names)}); every rank must run the same batch")
    if flags[2].item() and not failed:
        raise ValueError(f"lora_ext: another of the {world} tensor-parallel ranks could not do its part of this call "
                         "(its error says why); no rank went on")


def short_names(names, limit=8):
    names = list(names) if names is not None else None
    if names is None or len(names) <= limit:
        return names
    return f"{names[:limit]} and {len(names) - limit} more"
