"""lora_ext: serve many LoRA adapters on one base model with grouped low-rank GEMM kernels."""

from lora_ext import kernel_config, losses, ops
from lora_ext._native import build_info, native_available, native_error
from lora_ext.ops import add_lora_, build_plan, linear_lora, lora_delta
from lora_ext.adapters import AdapterError, SlotTimeoutError, read_peft_adapter
from lora_ext.model import MultiLoraModel, patch_model
from lora_ext.model.trainer_module import TrainerModule

__version__ = "0.1.0"

__all__ = ["ops", "kernel_config", "losses", "lora_delta", "add_lora_", "linear_lora", "build_plan", "build_info",
           "native_available", "native_error", "patch_model", "MultiLoraModel", "AdapterError", "SlotTimeoutError",
           "read_peft_adapter", "TrainerModule", "__version__"]
