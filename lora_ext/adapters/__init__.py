"""Adapter files and adapter memory: PEFT directories, the host cache, device slots."""

from lora_ext.adapters.peft_format import AdapterError, PeftAdapter, read_peft_adapter

__all__ = ["AdapterError", "PeftAdapter", "read_peft_adapter"]
