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
    rows, length, vocab = logits.shape
    # One cross-entropy over every token (one backward through the logits), then each adapter's
    # mean over its own rows' tokens, gathered by index (not as a masked sum over all rows: a NaN
    # loss on one adapter times another's zero weight would be NaN for that one too).
    token_loss = F.cross_entropy(logits.reshape(-1, vocab).float(), labels.reshape(-1), ignore_index=ignore_index,
                                 reduction="none").view(rows, length)
    row_loss, row_tokens = token_loss.sum(1), (labels != ignore_index).sum(1).to(token_loss.dtype)
    losses = {}
    for name in dict.fromkeys(n for n in adapter_names if n not in (None, BASE_ADAPTER)):
        mine = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=logits.device)
        losses[name] = row_loss.index_select(0, mine).sum() / row_tokens.index_select(0, mine).sum()
    total = sum(losses.values()) if losses else logits.sum() * 0
    return total, losses
