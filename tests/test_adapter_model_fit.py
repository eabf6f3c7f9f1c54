"""Config values that are valid alone but do not fit this model: layers_to_transform naming layers
the model does not have, scalings that overflow in the model's dtype. Refused with an AdapterError,
nothing registered."""

import json
import os

import pytest
import torch

import lora_ext
from tiny_models import build_model, save_adapter


def edit_config(path, **changes):
    file = os.path.join(path, "adapter_config.json")
    with open(file) as f:
        config = json.load(f)
    config.update(changes)
    with open(file, "w") as f:
        json.dump(config, f)
    return path


def test_layers_to_transform_naming_layers_the_model_lacks_refused(tmp_path):
    path = save_adapter("llama", str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=["q_proj"],
                        layers_to_transform=[1])
    edit_config(path, layers_to_transform=[1, 7])  # the tiny Llama has layers 0 and 1
    mm = lora_ext.patch_model(build_model("llama"), max_adapters=2, max_rank=8)
    with pytest.raises(lora_ext.AdapterError, match=r"adapter 'a': adapter_config.json field 'layers_to_transform' "
                       r"names layers \[7\] that the model's patched modules do not have \(they are in layers 0-1\)"):
        mm.load_adapter("a", path)
    assert mm.adapters() == []


def test_scaling_that_overflows_in_float16_refused(tmp_path):
    path = save_adapter("llama", str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=["q_proj"])
    edit_config(path, lora_alpha=1e6)  # scaling 2.5e5: finite in float32, not in float16
    mm16 = lora_ext.patch_model(build_model("llama", torch.float16), max_adapters=2, max_rank=8)
    with pytest.raises(lora_ext.AdapterError, match=r"module 'model.layers.0.self_attn.q_proj': scaling 250000 "
                       r"\(from lora_alpha and r\) overflows to infinity in torch.float16"):
        mm16.load_adapter("a", path)
    assert mm16.adapters() == []
    mm32 = lora_ext.patch_model(build_model("llama"), max_adapters=2, max_rank=8)
    mm32.load_adapter("a", path)  # the same scaling is fine in float32
    assert [a["name"] for a in mm32.adapters()] == ["a"]
