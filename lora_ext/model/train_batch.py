"""The batch of one training forward pass: per patched layer, the weights of the batch's adapters
stacked as the ops take them, built from the trainable adapters' leaves so that autograd carries
each row's gradient to its own adapter (and an adapter with no row gets none), plus each row's
LoRA dropout.

Only the batch's adapters are stacked, padded to the largest rank this layer sees in the batch (a
compiled model's: max_adapters x max_rank for every batch, mm.compile());
frozen (served) adapters may share a training batch and get no gradient. The stacks are float32
(trainable adapters are float32 whatever the base model's dtype, as PEFT trains them).
"""

import torch
import torch.nn.functional as F

from lora_ext.adapters.trainable import ADAPTER_DTYPE
from lora_ext.model.batch import BatchRows
from lora_ext.model.row_epilogue import scale_and_offset


def _extras(module_weights):
    """Whether a module's weights (trainable or frozen) have DoRA or a lora_B bias."""
    return any(getattr(module_weights, k, None) is not None for k in ("lora_bias", "magnitude", "dora_scale"))


class TrainBatch(BatchRows):
    training = True

    def __init__(self, owner, names, store, device, fixed_shape=None):
        """names: each row's adapter name, or None for the base model alone. fixed_shape: (slots,
        rank, layers) for a compiled model: every layer's stacks are built here, before the model
        runs, all (slots, rank, ...) whatever the batch's adapters, so a compiled graph sees the
        same shapes (and no Python branching on adapters) for every adapter mix."""
        self.adapters = list(dict.fromkeys(n for n in names if n is not None))
        slots = fixed_shape[0] if fixed_shape is not None else max(len(self.adapters), 1)
        if len(self.adapters) > slots:
            raise ValueError(f"lora_ext: a compiled training batch takes at most max_adapters={slots} adapters, "
                             f"this one has {len(self.adapters)}: {self.adapters}")
        index = {n: i for i, n in enumerate(self.adapters)}
        row_slots = torch.tensor([index[n] if n is not None else -1 for n in names], dtype=torch.long, device=device)
        super().__init__(owner, row_slots, slots, any_adapter=bool(self.adapters))
        # each adapter's weights: a TrainableAdapter (leaves) or the frozen one's AdapterSlotWeights
        self.sources = [store.trainable(n) or store.slot_weights(n) for n in self.adapters]
        for name, src in zip(self.adapters, self.sources):
            if fixed_shape is not None and (src.saved or any(_extras(m) for m in src.modules.values())):
                raise ValueError(f"lora_ext: adapter {name!r} has DoRA, a lora_B bias or modules_to_save, which "
                                 "compiled training batches (mm.compile()) do not support yet")
        dropout = [getattr(src, "dropout", 0.0) for src in self.sources]
        dropout += [0.0] * (slots - len(dropout))
        # with dropout the layers take another path; a compiled model's takes the same one for
        # every mix (the one any of the trainable adapters needs), or the graph would recompile
        with_dropout = any(dropout) if fixed_shape is None else any(
            store.trainable(n).dropout for n in store.trainable_names())
        self.dropout = torch.tensor(dropout, device=device) if with_dropout else None
        self.device = device
        self.fixed = None
        if fixed_shape is not None:
            rank, layers = fixed_shape[1:]
            # zero stacks of layers no adapter of the batch targets hang off this one scalar, so
            # they require grad like the others without each getting a .grad of its own
            self.anchor = torch.zeros((), device=device, requires_grad=True)
            self.fixed = {layer.module_name: self._stack(layer, slots, rank, fixed=True) for layer in layers}

    def stacks(self, layer):
        """(lora_a (S, R, d_in), lora_b (S, d_out, R) as a rank-major view, scales (S,), ranks (S,))
        for `layer`, S the batch's adapters, R the largest rank among them here; float32, built
        from the leaves (so they take part in autograd). Built for every call, never kept: under
        gradient checkpointing the recomputed forward needs its own graph. (A compiled model's
        batch builds every layer's before the model runs, in its fixed shape, and keeps them for
        the step: recomputation then reuses them, which non-reentrant checkpointing supports.)"""
        if self.fixed is not None:
            return self.fixed[layer.module_name]
        ranks = [e.rank for e in (src.modules.get(layer.module_name) for src in self.sources) if e is not None]
        return self._stack(layer, len(self.sources), max([1] + ranks))

    def module_copies(self, module):
        """[(batch slot, {"weight", "bias"})] of the batch's adapters that have their own copy of
        `module` (modules_to_save): a trainable adapter's leaves, a frozen one's weights."""
        return [(i, {k: t.to(self.device) for k, t in src.saved[module].items()})
                for i, src in enumerate(self.sources) if module in src.saved]

    def epilogue_tables(self, layer):
        """(scale, offset) (slots + 1, d_out) float32 for `layer`, or None when no adapter of the
        batch has DoRA or a lora_B bias there (lora_ext/model/row_epilogue.py): from the leaves,
        so m and the bias get their gradients (DoRA's norm is recomputed from the current A and B
        and detached, as PEFT does); a frozen adapter's from its slot weights. Row 0: base rows."""
        if self.fixed is not None:  # a compiled model's batch: no adapter has them (checked above), no branching
            return None
        entries = [src.modules.get(layer.module_name) for src in self.sources]
        if not any(e is not None and _extras(e) for e in entries):
            return None
        width, base_bias = layer.out_features, layer.unmerged_bias()
        unchanged = scale_and_offset(None, None, 0.0, None, width, self.device)  # scale 1, offset 0
        rows = [unchanged]
        for e in entries + [None] * (self.num_slots - len(entries)):
            if e is None or not _extras(e):
                rows.append(unchanged)
                continue
            g = getattr(e, "dora_scale", None)  # a frozen adapter's, computed at load
            if getattr(e, "magnitude", None) is not None:
                g = e.magnitude / layer.dora_norm(e.lora_a, e.lora_b, e.scaling).to(self.device)
            rows.append(scale_and_offset(g, e.lora_bias, e.scaling, base_bias, width, self.device))
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def _stack(self, layer, slots, max_rank, fixed=False):
        """The stacks of `layer` with `slots` entries of `max_rank` rows: the batch's adapters
        first, then zeros of rank 0 (no leaf: they get no gradient). fixed: for a compiled model."""
        entries = [src.modules.get(layer.module_name) for src in self.sources]
        entries += [None] * (slots - len(entries))
        a_rows, b_rows, scales, ranks = [], [], [], []
        for e in entries:
            if e is None:  # this adapter does not target the layer: rank 0 adds nothing
                a_rows.append(torch.zeros(max_rank, layer.in_features, dtype=ADAPTER_DTYPE, device=self.device))
                b_rows.append(torch.zeros(max_rank, layer.out_features, dtype=ADAPTER_DTYPE, device=self.device))
                scales.append(0.0)
                ranks.append(0)
                continue
            a, b_t = (e.lora_a, e.lora_b.T) if hasattr(e, "lora_b") else (e.lora_a, e.lora_b_t)
            pad = max_rank - e.rank
            a, b_t = a.to(device=self.device, dtype=ADAPTER_DTYPE), b_t.to(device=self.device, dtype=ADAPTER_DTYPE)
            a_rows.append(F.pad(a, (0, 0, 0, pad)) if pad else a)
            b_rows.append(F.pad(b_t, (0, 0, 0, pad)) if pad else b_t)
            scales.append(e.scaling)
            ranks.append(e.rank)
        a, b = torch.stack(a_rows), torch.stack(b_rows)
        if fixed:
            # the same requires_grad whichever adapters the batch has, or the graph recompiles: a
            # layer that none of them targets takes a gradient that ends in the anchor
            a, b = (t if t.requires_grad else t + self.anchor for t in (a, b))
        return (a, b.transpose(1, 2),
                torch.tensor(scales, dtype=torch.float32, device=self.device),
                torch.tensor(ranks, dtype=torch.int32, device=self.device))

    def drop(self, rows, slot_ids):
        """The LoRA input of each token row: PEFT's dropout with its adapter's probability (the
        base layer sees the rows undropped). Autograd keeps the mask, so the backward uses the
        same one."""
        if self.dropout is None:
            return rows
        p = torch.where(slot_ids >= 0, self.dropout[slot_ids.clamp(min=0)], torch.zeros((), device=rows.device))
        p = p.to(rows.dtype)[:, None]
        keep = torch.rand(rows.shape, device=rows.device, dtype=torch.float32) >= p
        return rows * keep / (1 - p)
