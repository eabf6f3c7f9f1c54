"""Losses for training many adapters in one batch."""

import torch
import torch.nn.functional as F

BASE_ADAPTER = "__base__"


def per_adapter_loss(logits, labels, adapter_names, *, shift=True, ignore_index=-100):
    """(total, {adapter: loss}) for a batch whose rows use different adapters.

    Each adapter's loss is the mean token cross-entropy over its own rows, exactly the loss of
    training that adapter alone on those rows; total is their sum, so each adapter's gradient is
    the gradient of its own loss. Rows of "__base__" (or None) are left out. logits: (B, L, V);
    labels: (B, L), ignore_index where no loss is wanted; shift=True for causal language models
    (position t predicts label t + 1).
    """
    if len(adapter_names) != logits.shape[0]:
        raise ValueError(f"lora_ext: adapter_names has {len(adapter_names)} entries but the batch has "
                         f"{logits.shape[0]} rows")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    losses = {}
    for name in dict.fromkeys(n for n in adapter_names if n not in (None, BASE_ADAPTER)):
        rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=logits.device)
        rows_logits = logits.index_select(0, rows)
        losses[name] = F.cross_entropy(rows_logits.reshape(-1, rows_logits.shape[-1]).float(),
                                       labels.index_select(0, rows).reshape(-1), ignore_index=ignore_index)
    total = sum(losses.values()) if losses else logits.sum() * 0
    return total, losses
