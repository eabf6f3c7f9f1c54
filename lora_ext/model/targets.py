"""Which modules of a model get LoRA slots: PEFT's target_modules semantics."""

import re

import torch

from lora_ext.adapters.config import names_module


def conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain torch models
        return None
    return Conv1D


def is_conv1d(module):
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_supported_layer(module):
    """Layers lora_ext patches when named: linear layers and embeddings."""
    return is_linear_layer(module) or type(module) is torch.nn.Embedding


def is_linear_layer(module):
    """What "all-linear" patches (with the output head left out)."""
    return isinstance(module, torch.nn.Linear) or is_conv1d(module)


def _matches(name, target_modules):
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return names_module(target_modules, name)


def find_target_modules(model, target_modules):
    """Names of the modules to patch.

    target_modules: a list of name suffixes, a regex matched against the full module name, or
    "all-linear" (every nn.Linear / transformers Conv1D except the output head); a list may hold
    "all-linear" and more names (["all-linear", "embed_tokens"]).
    """
    if target_modules is None or (not isinstance(target_modules, str) and not list(target_modules)):
        raise ValueError("lora_ext: target_modules must be 'all-linear', a regex string or a non-empty list of "
                         "module name suffixes")
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    all_linear = target_modules == "all-linear" or (not isinstance(target_modules, str) and "all-linear" in target_modules)
    if all_linear and not isinstance(target_modules, str):  # "all-linear" plus named modules (an embedding)
        target_modules = [t for t in target_modules if t != "all-linear"]
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        if all_linear and is_linear_layer(module) and module is not output_head:
            names.append(name)
            continue
        if target_modules != "all-linear" and _matches(name, target_modules):
            if not is_supported_layer(module):
                raise ValueError(f"lora_ext: target module {name!r} is a {type(module).__name__}; only torch.nn.Linear, "
                                 "transformers Conv1D and torch.nn.Embedding layers are supported")
            names.append(name)
    if not names:
        raise ValueError(f"lora_ext: target_modules={target_modules!r} matches no module of "
                         f"{type(model).__name__}")
    return names


def modules_targeted_by(config, patched):
    """The patched module names a PEFT config targets, as PEFT chooses them: target_modules
    ("all-linear", a regex matched against the full name, or name suffixes), minus exclude_modules,
    within layers_to_transform (layers found by layers_pattern)."""
    from lora_ext.adapters.peft_format import layer_index

    def chosen(spec, name):
        if spec is None:
            return False
        if spec == "all-linear":
            return True
        return _matches(name, spec if isinstance(spec, str) else list(spec))

    names = [n for n in patched if chosen(config.target_modules, n) and not chosen(config.exclude_modules, n)]
    if config.layers_to_transform is not None:
        layers = set(config.layers_to_transform)
        names = [n for n in names if layer_index(n, config.layers_pattern) in layers]
    return names
