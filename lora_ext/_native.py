"""Loads the compiled kernels (lora_ext._C) and says what they were built with.

A missing or broken native module is not fatal at import: the ops fall back to the pure-PyTorch
reference and `native_error()` says why the module did not load.
"""

import torch

_load_error = None
try:
    from lora_ext import _C  # noqa: F401  (importing registers torch.ops.lora_ext.*)
except (ImportError, OSError) as exc:  # no build, or built against another torch
    _load_error = f"{type(exc).__name__}: {exc}"


def native_available() -> bool:
    return _load_error is None


def native_error():
    """Why lora_ext._C did not load, or None when it did."""
    return _load_error


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether torch.ops.lora_ext.<op_name> has a kernel for a dispatch key ("CPU", "CUDA")."""
    if not native_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_ext::{op_name}", dispatch_key)


def build_info() -> dict:
    """What the package was built with: {"native", "backends", "build", "error"}."""
    if not native_available():
        return {"native": False, "backends": ["reference"], "build": None, "error": _load_error}
    backends = [key for key in ("CPU", "CUDA") if has_kernel("lora_delta", key)]
    return {
        "native": True,
        "backends": backends,
        "build": torch.ops.lora_ext.build_info(),
        "error": None,
    }
