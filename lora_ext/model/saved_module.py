"""Whole-module copies per adapter (PEFT's modules_to_save: an lm_head, a classification head, an
embedding trained in full): each adapter's copy serves exactly its rows.

The copies live in device slots like the LoRA weights (the same slot index, evicted and pinned
with the adapter): a stack of max_adapters copies of the module's weight (and bias), preallocated
when the model is patched with patch_model(..., modules_to_save=[...]). A batch runs the base
module on every row, then, for each slot of the batch that has a copy here, one GEMM (or lookup)
over that slot's rows with its copy: grouped by slot, never a loop over rows.
"""

import torch
import torch.nn.functional as F

from lora_ext.model.batch import current_batch


def _is_dtensor(tensor):
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


class SavedModuleLayer(torch.nn.Module):
    def __init__(self, base_layer, module_name, max_adapters, owner):
        super().__init__()
        if _is_dtensor(base_layer.weight):
            raise ValueError(f"lora_ext: modules_to_save module {module_name!r} is tensor-parallel; copies of sharded "
                             "modules are not supported yet")
        if type(base_layer) not in (torch.nn.Linear, torch.nn.Embedding):
            raise ValueError(f"lora_ext: modules_to_save module {module_name!r} is a {type(base_layer).__name__}; "
                             "lora_ext serves copies of torch.nn.Linear and torch.nn.Embedding modules")
        self.base_layer = base_layer
        self.module_name = module_name
        self.is_embedding = type(base_layer) is torch.nn.Embedding
        weight, bias = base_layer.weight, getattr(base_layer, "bias", None)
        self.register_buffer("weights", torch.zeros(max_adapters, *weight.shape, dtype=weight.dtype,
                                                    device=weight.device), persistent=False)
        self.register_buffer("biases", None if bias is None else torch.zeros(max_adapters, *bias.shape, dtype=bias.dtype,
                                                                             device=bias.device), persistent=False)
        self.shapes = {"weight": tuple(weight.shape), "bias": None if bias is None else tuple(bias.shape)}
        self.slots = set()  # slots whose adapter has a copy of this module
        self.merged = None  # the module's own (weight, bias) parameters while an adapter's copy is merged
        self._owner = owner

    @property
    def weight(self):
        """The base module's weight (code that reads e.g. the output embeddings' weight sees it)."""
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    @property
    def dtype(self):
        return self.weights.dtype

    @property
    def device(self):
        return self.weights.device

    def write_slot(self, slot, copy, non_blocking=False):
        """Puts an adapter's copy ({"weight": t, "bias": t}, cast to the module's dtype) into
        `slot`, or marks the slot as having none (None)."""
        if copy is None:
            self.slots.discard(slot)
            return
        self.weights[slot].copy_(copy["weight"], non_blocking=non_blocking)
        if self.biases is not None:
            self.biases[slot].copy_(copy["bias"], non_blocking=non_blocking)
        self.slots.add(slot)

    def merge(self, copy):
        """Serves `copy` to every row: the module's parameters are swapped for it (not written:
        GPT-2's lm_head shares its weight with the embedding, which must not change)."""
        base = self.base_layer
        self.merged = (base.weight, getattr(base, "bias", None))
        base.weight = torch.nn.Parameter(copy["weight"].to(base.weight).clone(), requires_grad=False)
        if self.merged[1] is not None:
            base.bias = torch.nn.Parameter(copy["bias"].to(self.merged[1]).clone(), requires_grad=False)

    def unmerge(self):
        base = self.base_layer
        base.weight = self.merged[0]
        if self.merged[1] is not None:
            base.bias = self.merged[1]
        self.merged = None

    def forward(self, x, *args, **kwargs):
        base = self._modules["base_layer"]
        out = base(x, *args, **kwargs)
        batch = current_batch(self._owner)
        if batch is None or not batch.any_adapter:
            return out
        if batch.training:  # the batch's copies (trainable leaves among them), through autograd
            copies = batch.module_copies(self.module_name)
        elif self.slots.isdisjoint(batch.slots):
            return out
        else:
            copies = [(slot, {"weight": self.weights[slot], "bias": None if self.biases is None else self.biases[slot]})
                      for slot in sorted(self.slots & batch.slots)]
        rows_in = x.reshape(-1) if self.is_embedding else x.reshape(-1, x.shape[-1])
        slot_ids, _ = batch.slots_and_plan(rows_in.shape[0])
        flat = out.view(-1, out.shape[-1])
        for slot, copy in copies:
            rows = (slot_ids == slot).nonzero().squeeze(1)
            weight = copy["weight"]
            if self.is_embedding:
                values = F.embedding(rows_in[rows], weight, base.padding_idx)
            else:
                values = F.linear(rows_in[rows].to(weight.dtype), weight, copy.get("bias"))
            # out of place under autograd (the copies may be leaves), in place when serving
            if batch.training:
                flat = flat.index_put((rows,), values.to(flat.dtype))
            else:
                flat[rows] = values.to(flat.dtype)
        return flat.view(out.shape)

    def extra_repr(self):
        return f"{self.module_name}: copies in {self.weights.shape[0]} slots"
