"""The patched model as an nn.Module that transformers.Trainer (or any loop written for one
module) can train: its parameters are the named trainable adapters' weights and nothing else;
each batch row names its adapter by index; the loss is lora_ext.losses.per_adapter_loss.

    mm = lora_ext.patch_model(model, max_adapters=8, max_rank=16)
    for name in ("sql", "chat"):
        mm.add_adapter(name, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    module = lora_ext.TrainerModule(mm, ["sql", "chat"])
    # dataset rows: {"input_ids": [...], "attention_mask": [...], "labels": [...], "adapter_ids": 0 or 1}
    transformers.Trainer(model=module, args=training_args, train_dataset=rows).train()
    mm.eval(); mm.save_adapter("sql", "out/sql")

Trainer then does what it does for any module: the optimizer over module.parameters() (the
adapters' leaves), scheduling, clipping, accumulation, logging; its model.to(device) moves the
patched model too. What it saves itself is this module's state dict (keys
"weights.<adapter>/<module, ':' for '.'>/lora_A"); PEFT directories come from mm.save_adapter. The
base model's own features (generation, checkpointing) stay on mm.
"""

import torch

from lora_ext.adapters.config import AdapterError
from lora_ext.losses import per_adapter_loss

BASE_ROW = -1  # adapter_ids entry of a row that runs the base model alone


class TrainerModule(torch.nn.Module):
    def __init__(self, mm, adapter_names):
        super().__init__()
        self.mm = [mm]  # in a list: not a submodule (its base model's parameters are not trained)
        self.adapter_names = list(adapter_names)
        if len(set(self.adapter_names)) != len(self.adapter_names):
            raise AdapterError(f"TrainerModule: adapter names repeat: {self.adapter_names}")
        self.weights = torch.nn.ParameterDict()
        for name in self.adapter_names:
            trainable = mm.store.trainable(name)
            if trainable is None:
                raise AdapterError(f"TrainerModule: adapter {name!r} is not trainable (add_adapter, or "
                                   "load_adapter(..., trainable=True))")
            for module, weights in trainable.modules.items():
                # ParameterDict keys may not hold dots; the leaves themselves are registered, so
                # an optimizer over this module's parameters updates the adapter in place.
                key = f"{name}/{module}".replace(".", ":")
                self.weights[f"{key}/lora_A"] = weights.lora_a
                self.weights[f"{key}/lora_B"] = weights.lora_b
                for extra, leaf in (("lora_B_bias", weights.lora_bias), ("lora_magnitude_vector", weights.magnitude)):
                    if leaf is not None:
                        self.weights[f"{key}/{extra}"] = leaf
            for module, copy in trainable.saved.items():  # modules_to_save copies
                for which, leaf in copy.items():
                    self.weights[f"{name}/{module}".replace(".", ":") + f"/copy_{which}"] = leaf
        self.mm[0].train(self.training)

    def train(self, mode=True):
        super().train(mode)
        self.mm[0].train(mode)
        return self

    def forward(self, input_ids, attention_mask=None, labels=None, adapter_ids=None):
        """adapter_ids: (B,) integers, each row's index into adapter_names (-1: the base model).
        Returns a CausalLMOutput with the logits and, when labels are given, the sum over the
        batch's adapters of each one's mean token loss over its rows (labels -100: no loss)."""
        if adapter_ids is None:
            raise ValueError("lora_ext TrainerModule: each batch needs adapter_ids (one per row)")
        from transformers.modeling_outputs import CausalLMOutput  # (transformers is optional for lora_ext)

        names = [self._name(int(i)) for i in adapter_ids.tolist()]
        logits = self.mm[0](input_ids=input_ids, attention_mask=attention_mask, adapter_names=names).logits
        loss = per_adapter_loss(logits, labels, names)[0] if labels is not None else None
        if loss is not None and self.training and not loss.requires_grad:
            # a batch of base rows only: nothing to train, but Trainer calls backward on the loss;
            # a detached leaf lets it, and no adapter gets a gradient (absent adapters stay as they are)
            loss = loss.detach().requires_grad_()
        return CausalLMOutput(loss=loss, logits=logits)

    def _apply(self, fn, *args, **kwargs):
        """.to(device) and the like move the patched model with the adapters (the adapters'
        parameters keep their identity: the optimizer and the store see the moved ones)."""
        self.mm[0].model._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def _name(self, index):
        if index == BASE_ROW:
            return None
        if not 0 <= index < len(self.adapter_names):
            raise ValueError(f"lora_ext TrainerModule: adapter_ids entry {index} is not an index into "
                             f"{len(self.adapter_names)} adapters {self.adapter_names} (or -1 for the base model)")
        return self.adapter_names[index]
