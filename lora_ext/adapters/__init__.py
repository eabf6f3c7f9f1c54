"""Adapter files and adapter memory: the PEFT reader and validator (peft_format), and the memory
manager (store: registry, host cache, device slots) with its parts (host_cache, slots)."""

from lora_ext.adapters.peft_format import AdapterError, PeftAdapter, read_peft_adapter
from lora_ext.adapters.store import AdapterRecord, AdapterStore, SlotTimeoutError

__all__ = ["AdapterError", "AdapterRecord", "AdapterStore", "PeftAdapter", "SlotTimeoutError", "read_peft_adapter"]
