"""Saves a trainable adapter as a PEFT directory that PEFT and lora_ext both load: adapter_config.json
with every field written out, and adapter_model.safetensors with PEFT's key names. The directory
is written under a temporary name and renamed into place (lora_ext.atomic), so a failure midway
leaves the previous version intact."""

import os
import re

import torch

from lora_ext import atomic
from lora_ext.adapters.config import AdapterError


def peft_config(adapter, task_type=None, base_model_name_or_path=None, fan_in_fan_out=False):
    """adapter_config.json of `adapter`: its modules named exactly (full module names as
    target_modules), ranks and alphas that differ from r and lora_alpha in rank_pattern and
    alpha_pattern (escaped names, which PEFT's pattern rule matches only at their own module)."""
    config = adapter.config
    modules = sorted(adapter.modules)
    rank_pattern = {re.escape(m): config.rank(m) for m in modules if config.rank(m) != config.r}
    alpha_pattern = {re.escape(m): config.alpha(m) for m in modules if config.alpha(m) != config.lora_alpha}
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": config.r, "lora_alpha": config.lora_alpha, "target_modules": modules,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": config.use_rslora,
        "lora_dropout": config.lora_dropout, "bias": "none", "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True, "use_dora": config.use_dora, "lora_bias": config.lora_bias,
        "modules_to_save": sorted(getattr(adapter, "saved", {})) or None, "layers_to_transform": None,
        "layers_pattern": None, "inference_mode": True, "revision": None,
    }


def peft_tensors(adapter, embedding_modules=()):
    """{key: tensor} as PEFT saves them: base_model.model.<module>.lora_A.weight (r, d_in), lora_B (d_out, r),
    lora_B.bias (d_out,) and lora_magnitude_vector (d_out,) where the adapter has them; an embedding's
    lora_embedding_A (r, num_embeddings) and lora_embedding_B (dim, r)."""
    tensors = {}
    for module, m in adapter.modules.items():
        a_key, b_key = (("lora_embedding_A", "lora_embedding_B") if module in embedding_modules
                        else ("lora_A.weight", "lora_B.weight"))
        tensors[f"base_model.model.{module}.{a_key}"] = m.lora_a.detach().to("cpu").contiguous().clone()
        tensors[f"base_model.model.{module}.{b_key}"] = m.lora_b.detach().to("cpu").contiguous().clone()
        if getattr(m, "lora_bias", None) is not None:
            tensors[f"base_model.model.{module}.lora_B.bias"] = m.lora_bias.detach().to("cpu").contiguous().clone()
        if getattr(m, "magnitude", None) is not None:
            tensors[f"base_model.model.{module}.lora_magnitude_vector"] = m.magnitude.detach().to("cpu").contiguous().clone()
    for module, copy in getattr(adapter, "saved", {}).items():  # modules_to_save, as PEFT names them
        for which, t in copy.items():
            tensors[f"base_model.model.{module}.{which}"] = t.detach().to("cpu").contiguous().clone()
    return tensors


def save_peft_adapter(adapter, directory, *, overwrite=False, embedding_modules=(), **config_fields):
    """Writes `adapter` (a TrainableAdapter) into `directory`; refuses an existing directory unless
    `overwrite`. The files appear together or not at all. embedding_modules: its modules that are
    embeddings (their keys differ)."""
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise AdapterError(f"adapter {adapter.name!r}: {directory} already exists; pass overwrite=True to replace it")
    if any(not torch.isfinite(t).all() for t in adapter.parameters()):
        raise AdapterError(f"adapter {adapter.name!r}: its weights hold NaN or infinite values; not saved")
    with atomic.atomic_directory(directory) as tmp:
        save_file(peft_tensors(adapter, embedding_modules), os.path.join(tmp, "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        atomic.write_json(os.path.join(tmp, "adapter_config.json"), peft_config(adapter, **config_fields), indent=2)
