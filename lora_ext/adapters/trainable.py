"""Trainable adapters: each patched module's lora_A (r, d_in) and lora_B (d_out, r) as float32 leaf
tensors that any torch optimizer updates, created as PEFT creates them (add_adapter) or from a PEFT
directory (load_adapter(..., trainable=True)).

Float32 whatever the base model's dtype, as PEFT trains by default (autocast_adapter_dtype=True).
The training forward stacks the leaves of the batch's adapters per layer (lora_ext/model/train_batch.py),
so gradients reach them through autograd and an adapter with no row in a step gets none.
"""

import math
from dataclasses import dataclass

import torch

from lora_ext.adapters.config import AdapterError, names_module

ADAPTER_DTYPE = torch.float32


@dataclass
class TrainableModule:
    lora_a: torch.Tensor  # (rank, d_in), a leaf that requires grad
    lora_b: torch.Tensor  # (d_out, rank)
    rank: int
    scaling: float
    lora_bias: torch.Tensor = None  # (d_out,) leaf: lora_B's bias (lora_bias=True)
    magnitude: torch.Tensor = None  # (d_out,) leaf: DoRA's magnitude vector m


class TrainableAdapter:
    """One adapter's trainable weights: {module name: TrainableModule}, its config, its dropout."""

    def __init__(self, name, config, modules, dropout=0.0, saved=None):
        self.name = name
        self.config = config
        self.modules = modules
        self.dropout = dropout
        self.saved = saved or {}  # modules_to_save: {module name: {"weight": leaf, "bias": leaf}}

    def parameters(self):
        """The leaves, in module order: lora_A, lora_B, then lora_B's bias and DoRA's magnitude
        where the adapter has them, of each module; then the module copies (modules_to_save)."""
        return [t for m in self.modules.values() for t in (m.lora_a, m.lora_b, m.lora_bias, m.magnitude)
                if t is not None] + [t for copy in self.saved.values() for t in copy.values()]

    def version(self):
        """Changes whenever an optimizer (or anything in place) changes a weight."""
        return sum(t._version for t in self.parameters())

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.parameters())


def init_weights(init, rank, d_in, d_out, generator=None):
    """(A, B) as PEFT's LoraLayer initialises them: True: A Kaiming-uniform (a = sqrt(5)), B zeros;
    "gaussian": A normal with std 1 / rank, B zeros; False: both as nn.Linear initialises its weight
    (Kaiming-uniform, a = sqrt(5))."""
    a, b = torch.empty(rank, d_in), torch.zeros(d_out, rank)
    if init == "gaussian":
        a.normal_(0.0, 1.0 / rank, generator=generator)
    elif init is True or init is False:
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        if init is False:
            torch.nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=generator)
    else:
        raise AdapterError(f"init_lora_weights={init!r} is not implemented for new trainable adapters "
                           "(True, \"gaussian\" and False are)")
    return a, b


def init_embedding_weights(init, rank, num_embeddings, dim, generator=None):
    """(A (r, num_embeddings), B (dim, r)) as PEFT initialises an embedding's adapter: True or
    "gaussian": A zeros, B standard normal; False: both standard normal."""
    if init not in (True, False, "gaussian"):
        raise AdapterError(f"init_lora_weights={init!r} is not implemented for new trainable adapters "
                           "(True, \"gaussian\" and False are)")
    a = torch.zeros(rank, num_embeddings) if init is not False else torch.randn(rank, num_embeddings,
                                                                                 generator=generator)
    return a, torch.randn(dim, rank, generator=generator)


def module_leaves(layer, lora_a, lora_b):
    """(A, B) leaves of one module from its whole weights: this rank's part under tensor
    parallelism (the replicated half then sums its gradient over the ranks)."""
    lora_a, lora_b = layer.shard(lora_a, lora_b)
    a, b = leaf(lora_a, layer.device), leaf(lora_b, layer.device)
    if layer.sharding is not None:
        layer.sharding.sum_replicated_grads(a, b)
    return a, b


def leaf(tensor, device):
    """A float32 copy as an nn.Parameter: a leaf that requires grad, and one that a module can
    register as it is (lora_ext.TrainerModule), so optimizers built either way update the same."""
    return torch.nn.Parameter(tensor.detach().to(device=device, dtype=ADAPTER_DTYPE).clone())


def new_adapter(name, config, modules, layers, max_rank, generator=None, saved_layers=None):
    """A trainable adapter of `config` on `modules` (patched module names it targets), initialised
    as PEFT would: with lora_bias, lora_B's bias zeros (or, with init_lora_weights=False, as
    nn.Linear initialises a bias); with DoRA, m = ||W + scaling B A|| (so g starts at 1)."""
    trainable = {}
    for module in modules:
        layer, rank = layers[module], config.rank(module)
        where = f"adapter {name!r}: module {module!r}"
        if rank > max_rank:
            raise AdapterError(f"{where}: rank {rank} exceeds max_rank={max_rank}")
        if layer.is_embedding:
            a, b = init_embedding_weights(config.init_lora_weights, rank, *layer.full_shape, generator)
        else:
            a, b = init_weights(config.init_lora_weights, rank, *layer.full_shape, generator)
        bias = magnitude = None
        if (config.lora_bias or config.use_dora) and layer.sharding is not None:
            raise AdapterError(f"{where}: training DoRA or a lora_B bias on a tensor-parallel layer is not supported "
                               "yet")
        if config.lora_bias:
            bias = torch.zeros(layer.full_shape[1])
            if config.init_lora_weights is False:
                bias.uniform_(-1 / math.sqrt(rank), 1 / math.sqrt(rank), generator=generator)
        if config.use_dora:
            magnitude = layer.dora_norm(a, b, config.scaling(module))
        trainable[module] = module_weights(layer, where, a, b, rank, config.scaling(module), bias, magnitude)
    return TrainableAdapter(name, config, trainable, config.lora_dropout,
                            new_copies(name, config, saved_layers or {}))


def new_copies(name, config, saved_layers):
    """modules_to_save: a copy of each named module's base weights (PEFT starts its copies so), as
    leaves; the model must have been patched to serve copies of them."""
    if not config.modules_to_save:
        return {}
    chosen = {m: layer for m, layer in saved_layers.items()
              if names_module(config.modules_to_save, m)}
    if not chosen:
        raise AdapterError(f"adapter {name!r}: modules_to_save={list(config.modules_to_save)!r} names no module the "
                           f"model serves copies of (patch_model(..., modules_to_save=[...]) lists {sorted(saved_layers)})")
    # the module's own parameters, not an adapter's copy merged into it
    return {m: copy_leaves(layer, dict(zip(("weight", "bias"), layer.merged or (layer.weight, layer.bias))))
            for m, layer in chosen.items()}


def copy_leaves(layer, copy):
    """A module copy ({"weight", "bias"}; bias may be None) as float32 leaves on the layer's device."""
    return {which: leaf(t, layer.device) for which, t in copy.items() if t is not None}


def adapter_from_weights(name, config, module_weights_read, layers, saved=None, saved_layers=None):
    """A trainable adapter holding the weights read from a PEFT directory (ModuleWeights, and the
    module copies read for modules_to_save)."""
    modules = {m: module_weights(layers[m], f"adapter {name!r}: module {m!r}", w.lora_a, w.lora_b, w.rank, w.scaling,
                                 w.lora_bias, w.magnitude)
               for m, w in module_weights_read.items()}
    copies = {m: copy_leaves(saved_layers[m], copy) for m, copy in (saved or {}).items()}
    return TrainableAdapter(name, config, modules, config.lora_dropout, copies)


def module_weights(layer, where, a, b, rank, scaling, bias=None, magnitude=None):
    """A TrainableModule of leaves; a lora_B bias needs a base bias (as PEFT requires), and
    neither it nor DoRA is trained on tensor-parallel layers yet."""
    if bias is not None and layer.local_bias() is None:
        raise AdapterError(f"{where}: lora_bias=True needs a base layer with a bias (as PEFT requires); this one has "
                           "none")
    if (bias is not None or magnitude is not None) and layer.sharding is not None:
        raise AdapterError(f"{where}: training DoRA or a lora_B bias on a tensor-parallel layer is not supported yet")
    extras = [None if t is None else leaf(t, layer.device) for t in (bias, magnitude)]
    return TrainableModule(*module_leaves(layer, a, b), rank, scaling, *extras)
