"""Patching models so each batch row can use its own adapter."""

from lora_ext.model.multi_lora import MultiLoraModel, patch_model

__all__ = ["MultiLoraModel", "patch_model"]
