"""A linear (or embedding) layer with device slots for many adapters: base output plus each row's
LoRA delta."""

import torch
from torch.nn.modules import module as nn_module

from lora_ext import ops
from lora_ext.adapters.config import AdapterError
from lora_ext.model.batch import current_batch
from lora_ext.model.row_epilogue import RowEpilogue, apply_tables, dora_scale, weight_norm
from lora_ext.model.targets import is_conv1d


class LoraLayer(torch.nn.Module):
    """Wraps a torch.nn.Linear, transformers Conv1D or torch.nn.Embedding (the base layer is kept,
    not copied). An embedding's adapter (PEFT's lora_embedding_A (r, num_embeddings) and _B
    (dim, r)) is held as a linear one from num_embeddings to dim: row t adds c B A[:, token_t].

    Buffers, preallocated once: lora_a (S, R, d_in), lora_b stored rank-major (S, R, d_out) and
    seen by the ops as its (S, d_out, R) transpose, scales (S,) and ranks (S,). A slot that an
    adapter does not target in this layer has rank 0 and adds nothing. `epilogue` holds DoRA's
    scale and lora_B's bias per slot (lora_ext/model/row_epilogue.py).
    """

    def __init__(self, base_layer, module_name, max_adapters, max_rank, owner, sharding=None):
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.is_conv1d = is_conv1d(base_layer)
        self.is_embedding = isinstance(base_layer, torch.nn.Embedding)
        # Linear stores its weight (out, in); Conv1D (GPT-2) and Embedding store it (in, out)
        self.weight_in_out = self.is_conv1d or self.is_embedding
        if self.is_embedding and (base_layer.max_norm is not None or base_layer.scale_grad_by_freq
                                  or base_layer.sparse):
            raise ValueError(f"lora_ext: embedding {module_name!r} has max_norm={base_layer.max_norm}, scale_grad_by_freq="
                             f"{base_layer.scale_grad_by_freq}, sparse={base_layer.sparse}; lora_ext patches only plain "
                             "embeddings (max_norm rescales the weight in place at every lookup)")
        self.sharding = sharding  # tensor parallelism: how the base layer is split over ranks (or None)
        weight = self.local_weight()
        # in_features and out_features are this rank's (what the slots hold); full_shape is the whole layer's
        self.in_features, self.out_features = weight.shape if self.weight_in_out else weight.shape[::-1]
        self.full_shape = ((sharding.full_in, sharding.full_out) if sharding is not None
                           else (self.in_features, self.out_features))
        float_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        opts = dict(device=weight.device, dtype=float_dtype)
        self.register_buffer("lora_a", torch.zeros(max_adapters, max_rank, self.in_features, **opts), persistent=False)
        self.register_buffer("lora_b_rank_major", torch.zeros(max_adapters, max_rank, self.out_features, **opts),
                             persistent=False)
        self.register_buffer("scales", torch.zeros(max_adapters, dtype=torch.float32, device=weight.device),
                             persistent=False)
        self.register_buffer("ranks", torch.zeros(max_adapters, dtype=torch.int32, device=weight.device),
                             persistent=False)
        if self.is_embedding:  # (S, R, R) identities: an embedding adapter's shrink
            self.register_buffer("identity", torch.eye(max_rank, **opts).expand(max_adapters, max_rank, max_rank)
                                 .contiguous(), persistent=False)
        self.epilogue = RowEpilogue(max_adapters, self.out_features, weight.device)
        self.merge_backup = None  # (weight, bias) as they were before merge_adapter changed them
        self._owner = owner
        self._base_is_linear = type(base_layer) is torch.nn.Linear
        self._cache_op_args()

    def local_weight(self):
        """The base weight this process holds: the whole weight, or its shard under tensor
        parallelism (a view: writing it writes the model's weight)."""
        weight = self.base_layer.weight
        return weight if self.sharding is None else weight.to_local()

    def unmerged_weight(self):
        """The base weight without any merged adapter (what DoRA's norm is taken of)."""
        return self.local_weight() if self.merge_backup is None else self.merge_backup[0]

    def local_bias(self):
        """The base bias this process holds (None without one)."""
        bias = getattr(self.base_layer, "bias", None)  # an embedding has none
        return bias if bias is None or self.sharding is None else bias.to_local()

    def unmerged_bias(self):
        """The base bias without any merged lora_B bias."""
        return self.local_bias() if self.merge_backup is None else self.merge_backup[1]

    def dora_norm(self, lora_a, lora_b, scaling):
        """||W + scaling B A|| per output feature of the unmerged weight (float32, no autograd)."""
        return weight_norm(self.unmerged_weight(), self.weight_in_out, lora_a, lora_b, scaling)

    def dora_scale(self, lora_a, lora_b, scaling, magnitude, where):
        """DoRA's g = m / ||W + scaling B A|| per output feature for this layer's unmerged weight."""
        return dora_scale(self.unmerged_weight(), self.weight_in_out, lora_a, lora_b, scaling, magnitude, where)

    def check_base_copy(self, weight, where):
        """PEFT saves an embedding adapter with a copy of the embedding's base weight; lora_ext
        serves every adapter on the one base weight, so the copy must equal it."""
        base = self.unmerged_weight()
        if weight.shape != base.shape or not torch.equal(weight.to(device=base.device, dtype=base.dtype), base):
            raise AdapterError(f"{where}: the adapter carries its own base_layer weight {tuple(weight.shape)}, which "
                               "differs from the model's (for example a resized or retrained vocabulary); lora_ext "
                               "serves adapters on the model's own base weights")

    def shard(self, lora_a, lora_b):
        """This rank's part of an adapter module's (A (r, d_in), B (d_out, r)) as files hold them."""
        return (lora_a, lora_b) if self.sharding is None else self.sharding.shard(lora_a, lora_b)

    @property
    def lora_b(self):
        """(S, d_out, R) view of the rank-major storage: what the ops take."""
        return self.lora_b_rank_major.transpose(1, 2)

    @property
    def weight(self):
        """The base layer's weight (code that reads e.g. the input embeddings' weight sees it)."""
        return self.base_layer.weight

    @property
    def dtype(self):
        return self.lora_a.dtype

    @property
    def device(self):
        return self.lora_a.device

    def write_slot(self, slot, weights, non_blocking=False):
        """Puts one adapter's prepared weights (or None: not targeted here) into `slot`."""
        self.epilogue.write(slot, weights, self.unmerged_bias(), non_blocking=non_blocking)
        if weights is None:
            self.ranks[slot] = 0
            self.scales[slot] = 0.0
            return
        rank = weights.rank
        self.lora_a[slot, :rank].copy_(weights.lora_a, non_blocking=non_blocking)
        self.lora_b_rank_major[slot, :rank].copy_(weights.lora_b_t, non_blocking=non_blocking)
        self.scales[slot] = weights.scaling
        self.ranks[slot] = rank

    def merged(self, weights, where):
        """(weight, bias) in float32 with the adapter `weights` merged, as PEFT merges: W + c B A,
        times DoRA's g per output feature; the bias plus c b for a lora_B bias (None: unchanged)."""
        weight = self.local_weight()
        delta = weights.scaling * (weights.lora_b_t.float().T @ weights.lora_a.float()).to(weight.device)
        new = weight.float() + (delta.T if self.weight_in_out else delta)
        if weights.dora_scale is not None:
            g = weights.dora_scale.to(weight.device)
            new = new * (g[None, :] if self.weight_in_out else g[:, None])
        if weights.lora_bias is None:
            return new, None
        bias = self.local_bias()
        if bias is None:
            raise AdapterError(f"{where}: its lora_B bias cannot be merged: the base layer has no bias")
        return new, bias.float() + weights.scaling * weights.lora_bias.float().to(bias.device)

    def forward(self, x, *args, **kwargs):
        batch = current_batch(self._owner)
        # _modules and _parameters directly: nn.Module.__getattr__ is slow (benchmarks/NOTES.md), and
        # this runs once per patched layer per forward pass.
        base = self._modules["base_layer"]
        if batch is None or not batch.any_adapter:
            return base(x, *args, **kwargs)
        if self.is_embedding:
            return self._embedding_forward(batch, base, x)
        if self.sharding is not None:  # nn.Linear: no args or kwargs
            return self.sharding.forward(self, batch, x)
        params = base._parameters
        plain = not args and not kwargs and self._base_is_plain_linear(base)
        return self.lora_forward(batch, x, params["weight"], params["bias"], plain, lambda: base(x, *args, **kwargs))

    def lora_forward(self, batch, x, weight, bias, plain, run_base):
        """x's base output plus each row's delta, on this process's tensors. run_base() computes
        the base output; plain: it is just x @ weight.T + bias, so linear_lora may compute it
        instead, in one op with the delta."""
        slot_ids, plan = batch.slots_and_plan(x.numel() // self.in_features)
        if batch.training:
            return self._train_forward(batch, x, weight, bias, plain, run_base, slot_ids, plan)
        out = self._serve_forward(x, weight, bias, plain, run_base, slot_ids, plan)
        if self.epilogue.applies_to(batch):
            out = self.epilogue(out, batch.table_rows(slot_ids))
        return out

    def _serve_forward(self, x, weight, bias, plain, run_base, slot_ids, plan):
        rows = x.reshape(-1, self.in_features)
        lora_a, lora_b, scales, ranks = self._op_args
        if plain and rows.dtype == lora_a.dtype == weight.dtype:
            out = ops.linear_lora(rows, weight, bias, lora_a, lora_b, slot_ids, scales, ranks, plan)
            return out.view(*x.shape[:-1], self.out_features)
        out = run_base()
        if rows.dtype != lora_a.dtype:
            rows = rows.to(lora_a.dtype)
        if out.dtype == lora_a.dtype and out.is_contiguous():
            ops.add_lora_(out.view(-1, self.out_features), rows, lora_a, lora_b, slot_ids, scales, ranks, plan)
            return out
        delta = ops.lora_delta(rows, lora_a, lora_b, slot_ids, scales, ranks, plan)
        return out + delta.view(out.shape).to(out.dtype)

    def _embedding_forward(self, batch, base, ids):
        """The embeddings of `ids` plus each token's c B A[:, token], grouped by slot in the op: the
        token's column of A (gathered) is the op's input, through an identity shrink."""
        out = base(ids)
        tokens = ids.reshape(-1)
        slot_ids, plan = batch.slots_and_plan(tokens.numel())
        if batch.training:  # the batch's stacks, from the leaves (PEFT applies no dropout here)
            lora_a, lora_b, scales, ranks = batch.stacks(self)
            slots, rank = lora_a.shape[:2]
            identity = torch.eye(rank, dtype=lora_a.dtype, device=lora_a.device).expand(slots, rank, rank)
            a_columns = lora_a[slot_ids.clamp(min=0), :, tokens]  # (T, R)
            padding = base.padding_idx
            if padding is not None:  # as F.embedding(padding_idx=...) in PEFT: that column gets no gradient
                a_columns = torch.where((tokens == padding)[:, None], a_columns.detach(), a_columns)
            delta = ops.lora_delta(a_columns, identity.contiguous(), lora_b, slot_ids, scales, ranks, plan)
            return (out.to(delta.dtype) + delta.view(out.shape)).to(out.dtype)
        lora_a, lora_b, scales, ranks = self._op_args
        a_columns = lora_a[slot_ids.clamp(min=0), :, tokens]  # (T, R)
        ops.add_lora_(out.view(-1, self.out_features), a_columns, self._buffers["identity"], lora_b, slot_ids, scales,
                      ranks, plan)
        return out

    def _train_forward(self, batch, x, weight, bias, plain, run_base, slot_ids, plan):
        """base(x) plus each row's delta through autograd: the batch's adapters stacked from their
        leaves (float32), the LoRA input dropped per row; the sum rounded once to the base's dtype.
        Without dropout, a float32 plain base runs inside linear_lora: no separate sum forward,
        and its backward adds dy @ W into the LoRA's dx in one GEMM. DoRA's scale and lora_B's
        bias, built from the leaves too, apply to the float32 sum."""
        lora_a, lora_b, scales, ranks = batch.stacks(self)
        tables = batch.epilogue_tables(self)
        if batch.dropout is None and plain and x.dtype == lora_a.dtype == weight.dtype:
            out = ops.linear_lora(x.reshape(-1, self.in_features), weight, bias, lora_a, lora_b, slot_ids, scales,
                                  ranks, plan)
            out = out.view(*x.shape[:-1], self.out_features)
            return out if tables is None else apply_tables(out, *tables, batch.table_rows(slot_ids))
        out = run_base()
        rows = batch.drop(x.reshape(-1, self.in_features), slot_ids).to(lora_a.dtype)
        delta = ops.lora_delta(rows, lora_a, lora_b, slot_ids, scales, ranks, plan)
        total = out.to(delta.dtype) + delta.view(*out.shape[:-1], self.out_features)
        if tables is not None:
            total = apply_tables(total, *tables, batch.table_rows(slot_ids))
        return total.to(out.dtype)

    def _cache_op_args(self):
        """(lora_a, lora_b, scales, ranks) as the ops take them, kept until _apply replaces buffers
        (always set: a compiled model would otherwise guard on whether it is, and recompile)."""
        self._op_args = (self.lora_a, self.lora_b, self.scales, self.ranks)

    def _apply(self, fn, *args, **kwargs):
        """.to(), .cuda(), .half(), ... replace the buffers: cache the new op arguments, and keep
        the scales float32 (the ops take them so; a cast would round rsLoRA's scalings)."""
        scales = self.scales
        result = super()._apply(fn, *args, **kwargs)
        self._buffers["scales"] = scales.to(device=self.lora_a.device)
        self._cache_op_args()
        return result

    def _base_is_plain_linear(self, base):
        """Whether calling the base layer is just x @ W.T + b: a plain nn.Linear with no hooks
        that calling it would have run."""
        return self._base_is_linear and not (base._forward_hooks or base._forward_pre_hooks
                                             or nn_module._global_forward_hooks
                                             or nn_module._global_forward_pre_hooks)

    def extra_repr(self):
        slots, rank = self.lora_a.shape[:2]
        part = "" if self.sharding is None else f" ({self.sharding.style} part {self.sharding.rank} of " \
            f"{self.sharding.world_size})"
        return f"{self.module_name}: {self.in_features} -> {self.out_features}{part}, {slots} slots of rank up to {rank}"
