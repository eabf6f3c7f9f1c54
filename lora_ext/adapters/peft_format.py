"""Reads and validates a PEFT LoRA adapter directory, without any model.

A directory holds adapter_config.json and adapter_model.safetensors (or the legacy pickle
adapter_model.bin, read only when the caller opts in, and then with weights_only=True). Each
targeted module gets its rank and scaling exactly as PEFT computes them: rank_pattern and
alpha_pattern (first matching key wins), rsLoRA (alpha / sqrt(r)) or plain LoRA (alpha / r).
Everything that changes the math and is not implemented is refused, never ignored.
"""

import json
import math
import os
import re
from dataclasses import dataclass

import torch

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")
_INIT_THAT_CHANGES_THE_BASE = ("pissa", "olora", "corda")


class AdapterError(ValueError):
    """An adapter that lora_ext refuses; the message names the adapter, the file or module and the values."""


@dataclass
class ModuleWeights:
    """One module's LoRA: lora_a (rank, d_in) and lora_b (d_out, rank), as PEFT stores them."""

    module: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    rank: int
    scaling: float

    @property
    def nbytes(self):
        return self.lora_a.numel() * self.lora_a.element_size() + self.lora_b.numel() * self.lora_b.element_size()


@dataclass
class PeftAdapter:
    name: str
    path: str
    config: dict
    modules: dict  # module name in the base model -> ModuleWeights

    @property
    def nbytes(self):
        return sum(m.nbytes for m in self.modules.values())


def read_peft_adapter(name, path, *, allow_pickle=False):
    """Reads and validates the adapter directory `path`; raises AdapterError on anything refused."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise AdapterError(f"adapter {name!r}: {path!r} is not a directory")
    config = read_config(name, path)
    refuse_unsupported_config(name, path, config)
    tensors = read_tensors(name, path, allow_pickle)
    modules = pair_modules(name, path, tensors, config)
    check_layers_to_transform(name, config, modules)
    return PeftAdapter(name=name, path=path, config=config, modules=modules)


def read_config(name, path):
    file = os.path.join(path, CONFIG_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise AdapterError(f"adapter {name!r}: {file} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"adapter {name!r}: {file} cannot be read as JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: {file} must hold a JSON object, not {type(config).__name__}")
    for field_name, kind in (("r", int), ("lora_alpha", (int, float))):
        value = config.get(field_name)
        if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
            raise AdapterError(f"adapter {name!r}: {file} field {field_name!r} must be a positive number, "
                               f"not {value!r}")
    return config


def refuse_unsupported_config(name, path, config):
    """Config features that change the math and are not implemented are refused by name."""
    file = os.path.join(path, CONFIG_FILE)
    refusals = []
    if config.get("peft_type", "LORA") != "LORA":
        refusals.append(f"peft_type {config.get('peft_type')!r} (only LORA adapters are supported)")
    if config.get("use_dora"):
        refusals.append("use_dora=true (DoRA is not supported)")
    if config.get("modules_to_save"):
        refusals.append(f"modules_to_save={config['modules_to_save']!r} (fully trained modules are not supported)")
    if config.get("bias", "none") != "none":
        refusals.append(f"bias={config['bias']!r} (trained biases are not supported)")
    if config.get("lora_bias"):
        refusals.append("lora_bias=true (a bias on lora_B is not supported)")
    if config.get("layer_replication"):
        refusals.append("layer_replication (not supported)")
    if config.get("target_parameters"):
        refusals.append(f"target_parameters={config['target_parameters']!r} (LoRA on parameters is not supported)")
    if config.get("trainable_token_indices"):
        refusals.append("trainable_token_indices (trainable tokens are not supported)")
    if config.get("alora_invocation_tokens"):
        refusals.append("alora_invocation_tokens (activated LoRA is not supported)")
    init = str(config.get("init_lora_weights", "")).lower()
    if init.startswith(_INIT_THAT_CHANGES_THE_BASE):
        refusals.append(f"init_lora_weights={config['init_lora_weights']!r} (it changes the base weights; convert "
                        "the adapter to plain LoRA with PEFT first)")
    if refusals:
        raise AdapterError(f"adapter {name!r}: {file} uses unsupported features: " + "; ".join(refusals))


def read_tensors(name, path, allow_pickle):
    safetensors_file = os.path.join(path, SAFETENSORS_FILE)
    pickle_file = os.path.join(path, PICKLE_FILE)
    if os.path.exists(safetensors_file):
        from safetensors.torch import load_file

        try:
            return load_file(safetensors_file, device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt or truncated files
            raise AdapterError(f"adapter {name!r}: {safetensors_file} is corrupt or truncated: {exc}") from None
    if os.path.exists(pickle_file):
        if not allow_pickle:
            raise AdapterError(f"adapter {name!r}: {path} holds only {PICKLE_FILE}, a pickle, which can run code "
                               "when loaded; pass allow_pickle=True to load it with torch.load(weights_only=True)")
        try:
            tensors = torch.load(pickle_file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterError(f"adapter {name!r}: {pickle_file} cannot be loaded with weights_only=True: {exc}") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise AdapterError(f"adapter {name!r}: {pickle_file} must hold a dict of tensors")
        return tensors
    raise AdapterError(f"adapter {name!r}: {path} has neither {SAFETENSORS_FILE} nor {PICKLE_FILE}")


def pattern_value(patterns, module, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first key that matches the module's name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scaling(config, module):
    """(rank, scaling) that PEFT gives this module."""
    rank = pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, scaling


def pair_modules(name, path, tensors, config):
    halves, refused = {}, []
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            refused.append(key)
            continue
        halves.setdefault(match["module"], {})[match["which"]] = tensor
    if refused:
        kinds = sorted({_describe_key(k) for k in refused})
        raise AdapterError(f"adapter {name!r}: unsupported weights {refused[:5]}{' ...' if len(refused) > 5 else ''} "
                           f"({', '.join(kinds)})")
    if not halves:
        raise AdapterError(f"adapter {name!r}: {path} holds no lora_A / lora_B weights")
    modules = {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterError(f"adapter {name!r}: module {module!r} has {'lora_A' if 'A' in pair else 'lora_B'} "
                               f"but no {missing}")
        modules[module] = check_module(name, module, pair["A"], pair["B"], config)
    return modules


def _describe_key(key):
    if "lora_embedding" in key:
        return "embedding adapters are not supported"
    if "lora_magnitude_vector" in key:
        return "DoRA is not supported"
    if key.endswith(".bias"):
        return "LoRA biases are not supported"
    if "modules_to_save" in key:
        return "modules_to_save is not supported"
    return "not LoRA A/B weights"


def check_module(name, module, lora_a, lora_b, config):
    where = f"adapter {name!r}: module {module!r}"
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        raise AdapterError(f"{where}: lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} must be 2-D")
    if lora_a.shape[0] != lora_b.shape[1]:
        raise AdapterError(f"{where}: lora_A has rank {lora_a.shape[0]} (shape {tuple(lora_a.shape)}) but lora_B has "
                           f"rank {lora_b.shape[1]} (shape {tuple(lora_b.shape)})")
    if not lora_a.is_floating_point() or not lora_b.is_floating_point():
        raise AdapterError(f"{where}: weights must be floating point, not {lora_a.dtype} / {lora_b.dtype}")
    rank, scaling = module_scaling(config, module)
    if lora_a.shape[0] != rank:
        raise AdapterError(f"{where}: weights have rank {lora_a.shape[0]} but the config gives rank {rank} "
                           "(r / rank_pattern)")
    for half, tensor in (("lora_A", lora_a), ("lora_B", lora_b)):
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterError(f"{where}: {half} holds {bad} NaN or infinite values")
    return ModuleWeights(module, lora_a, lora_b, rank, float(scaling))


def layer_index(module, layers_pattern):
    patterns = layers_pattern if isinstance(layers_pattern, (list, tuple)) else [layers_pattern] if layers_pattern else []
    for pattern in patterns or [r"[^.]+"]:
        match = re.match(rf".*\.{pattern}\.(\d+)\.", module)
        if match:
            return int(match.group(1))
    return None


def check_layers_to_transform(name, config, modules):
    """Weights outside layers_to_transform mean the file and its config disagree."""
    layers = config.get("layers_to_transform")
    if layers is None:
        return
    allowed = {layers} if isinstance(layers, int) else set(layers)
    for module in modules:
        index = layer_index(module, config.get("layers_pattern"))
        if index is not None and index not in allowed:
            raise AdapterError(f"adapter {name!r}: module {module!r} is in layer {index}, but layers_to_transform "
                               f"is {sorted(allowed)}")
