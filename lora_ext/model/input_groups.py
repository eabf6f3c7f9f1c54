"""Layers that read the same input, served in one call: a Llama block's q/k/v, its gate/up.

The model calls such layers one after another with the same tensor. The first of them to run
computes every member's output in one linear_lora_group call (on CPU: one parallel region for
all their deltas, and for float32 decode their base GEMMs too, instead of one per layer) and
keeps the others' outputs until they are called with that same tensor. Which layers share an
input is not guessed from names: the patched layers under one parent with the same input width
are candidates, and the group is the most of them seen reading one tensor object (same
version) in one serving forward pass (cross-attention's k/v, reading the encoder's states, make
their own group; o_proj never joins). When a member is later called with another input than
its siblings, the group turns itself off for good (logged) and its layers run one by one, as
without groups. Training, autograd, torch.compile, hooks on a base layer and unequal dtypes take
the per-layer path.
"""

import logging
import weakref

import torch

from lora_ext import ops

logger = logging.getLogger("lora_ext")


def find_input_groups(layers):
    """SharedInputGroup per parent module over `layers` ({name: LoraLayer}) with two or more
    candidates: plain nn.Linear bases, not sharded, same input width, dtype and device."""
    by_key = {}
    for name, layer in layers.items():
        if layer.is_embedding or layer.sharding is not None or not layer._base_is_linear:
            continue
        key = (name.rpartition(".")[0], layer.in_features, layer.dtype, layer.device)
        by_key.setdefault(key, []).append(layer)
    groups = [SharedInputGroup(candidates) for candidates in by_key.values() if len(candidates) >= 2]
    for group in groups:
        for layer in group.candidates:
            layer.input_group = group
    return groups


class _Kept:
    """A member's output computed ahead of its call: valid for the same batch, input and version."""
    __slots__ = ("batch", "x", "version", "out")

    def __init__(self, batch, x, out):
        self.batch, self.x, self.version, self.out = batch, x, x._version, out

    def matches(self, batch, x):
        return self.batch is batch and self.x is x and self.version == x._version


class SharedInputGroup:
    def __init__(self, candidates):
        self.candidates = tuple(candidates)
        self.members = None  # learned: the candidates seen reading one input, in call order
        self.enabled = True
        self._seen = []  # the observation under way: (weak reference to an input, its version, its readers)
        self._kept = {}  # member -> _Kept

    def serve(self, layer, x, rows, batch, slot_ids, plan):
        """layer's output for input x ((T, d_in) view `rows`) when the group computes it (its own
        or kept from a sibling's call), else None: the layer runs on its own."""
        if not self.enabled or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        if self.members is None:
            self._observe(layer, x)
            if self.members is None:
                return None
        if layer not in self.members:
            return None
        kept = self._kept.pop(layer, None)
        if kept is not None:
            if kept.matches(batch, x):
                return kept.out
            if kept.batch is batch:
                self._turn_off(layer, "was called with another input than its siblings")
                return None
        if not all(m._base_is_plain_linear(m.base_layer) and m.dtype == rows.dtype == m.local_weight().dtype
                   for m in self.members):
            return None
        outs = self._run(rows, slot_ids, plan)
        for member, out in zip(self.members, outs):
            if member is not layer:
                self._kept[member] = _Kept(batch, x, out)
        return outs[self.members.index(layer)]

    def forget(self):
        """The end of a batch: drops the outputs kept for members, ends an observation."""
        self._kept.clear()
        if self.members is None:
            self._settle()

    def _run(self, rows, slot_ids, plan):
        weights, biases, lora_a, lora_b, scales, ranks = [], [], [], [], [], []
        for member in self.members:
            params = member.base_layer._parameters
            weights.append(params["weight"])
            biases.append(params["bias"])
            a, b, s, r = member._op_args
            lora_a.append(a)
            lora_b.append(b)
            scales.append(s)
            ranks.append(r)
        return ops.linear_lora_group(rows, weights, biases, lora_a, lora_b, slot_ids, scales, ranks, plan)

    def _observe(self, layer, x):
        """Learning: which candidates read one tensor. An observation ends when a layer runs again
        or the batch ends; the most candidates seen reading one tensor (two or more) make the group."""
        if any(layer in readers for _, _, readers in self._seen):
            self._settle()
            if self.members is not None:
                return
        for ref, version, readers in self._seen:
            if ref() is x and version == x._version:
                readers.append(layer)
                return
        self._seen.append((weakref.ref(x), x._version, [layer]))

    def _settle(self):
        readers = max((r for _, _, r in self._seen), key=len, default=[])
        if len(readers) >= 2:
            self.members = tuple(readers)
            logger.info("layers %s read the same input: served in one call", [m.module_name for m in self.members])
        self._seen = []

    def _turn_off(self, layer, why):
        self.enabled = False
        self._kept.clear()
        logger.warning("lora_ext: layer %s %s; its group %s now runs layer by layer", layer.module_name, why,
                       [m.module_name for m in self.members])
