"""Adapter files and adapter memory: the validated adapter_config.json (config), the PEFT reader and
validator (peft_format), and the memory manager (store: registry, host cache, device slots) with
its parts (host_cache, slots)."""

from lora_ext.adapters.config import AdapterConfig, read_config
from lora_ext.adapters.peft_format import AdapterError, PeftAdapter, read_peft_adapter
from lora_ext.adapters.store import AdapterRecord, AdapterStore, SlotTimeoutError

__all__ = ["AdapterConfig", "AdapterError", "AdapterRecord", "AdapterStore", "PeftAdapter", "SlotTimeoutError",
           "read_config", "read_peft_adapter"]
