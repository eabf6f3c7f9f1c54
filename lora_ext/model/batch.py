"""The batch of one model call: the adapter slot of every batch row.

Built once per call; per-token slot ids and the batch plan are computed once per input size
(so once per forward pass) and shared by every patched layer.
"""

import contextvars
from contextlib import contextmanager

from lora_ext import ops

_current_batch = contextvars.ContextVar("lora_ext_batch", default=None)


class BatchRows:
    training = False  # TrainBatch: a training forward (lora_ext/model/train_batch.py)

    def __init__(self, owner, row_slots, num_slots, any_adapter=True, slots=frozenset()):
        self.owner = owner
        self.row_slots = row_slots  # (B,) int64 on the layers' device, -1 = base model
        self.num_slots = num_slots
        self.any_adapter = any_adapter  # False: every row uses the base model, layers skip the ops
        self.slots = slots  # the slots the batch's rows use
        self._per_size = {}
        self._table_rows = {}

    def slots_and_plan(self, tokens):
        """(slot_ids, plan) for a layer input of `tokens` rows, batch-major. When the model repeats
        each batch row (beam search, several return sequences) or flattens (B, L) into B * L rows,
        every batch row's tokens stay together, so its slot repeats over them."""
        cached = self._per_size.get(tokens)
        if cached is not None:
            return cached
        rows = self.row_slots.numel()
        if tokens % rows != 0:
            raise ValueError(f"lora_ext: a patched layer got {tokens} token rows for a batch of {rows} rows; "
                             "each batch row must map to a whole number of token rows")
        slot_ids = self.row_slots.repeat_interleave(tokens // rows)
        cached = (slot_ids, ops.build_plan(slot_ids, self.num_slots))
        self._per_size[tokens] = cached
        return cached

    def table_rows(self, slot_ids):
        """slot_ids + 1: each token row's row in per-slot tables whose row 0 is for base rows
        (lora_ext/model/row_epilogue.py); once per input size."""
        rows = self._table_rows.get(slot_ids.numel())
        if rows is None:
            rows = self._table_rows[slot_ids.numel()] = slot_ids + 1
        return rows


@contextmanager
def active_batch(batch):
    token = _current_batch.set(batch)
    try:
        yield batch
    finally:
        _current_batch.reset(token)


def current_batch(owner):
    """The batch of the model call running now, or, outside any call, the owner's last training
    batch (gradient checkpointing recomputes layers during backward, after the call returned,
    and they must see the same rows)."""
    batch = _current_batch.get()
    if batch is not None and batch.owner is owner:
        return batch
    return owner.recompute_batch if owner.training else None
