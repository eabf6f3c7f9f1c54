"""Which kernels the ops use, and which ones ran.

Settings (defaults in brackets; the C++ module owns the list, the defaults and the checks,
csrc/kernel_config.cpp):

    cpu_isa            ["auto"]  "portable" forces the portable CPU item kernels
    cpu_gemm_min_rows  [64]      slots with at least this many rows run as two ATen GEMMs on CPU
    cpu_backward_gemm_min_rows [256]  the same for the backward (lora_backward), whose per-slot
                                 kernels measured faster up to 128-512 rows (benchmarks/NOTES.md)
    cpu_fused_linear   [True]    linear_lora's fused CPU path (lora_ext's GEMM + the deltas)
    cpu_avx512_bf16    [True]    bfloat16 shrink (and fused base GEMM) with AVX512-BF16 dot products
                                 where the CPU has them
    cpu_fused_linear_16bit ["auto"]  whether bfloat16 and float16 take the fused path too: "auto" where
                                 lora_ext has the unit ATen's GEMM would use (bfloat16: the AMX path
                                 where the CPU has AMX, else AVX512-BF16; float16: the AMX path from 9
                                 rows, else no AVX512-FP16), True always, False never
    cpu_fused_linear_max_rows [0]  the fused path takes batches of up to this many rows (more than
                                 32 only where d_in <= 4096); 0: 128
    cpu_amx            [True]    fused bfloat16 and float16, and the bfloat16 deltas of long
                                 segments, run on the AMX tile unit where the CPU has AMX-BF16 and the
                                 OS allows it (csrc/cpu/amx_linear.h, amx_deltas.h); False: AVX-512
                                 and ATen's GEMMs instead
    cpu_packed_gemm_min_rows [48]  the fused float32 base GEMM takes W in packed blocks (outer products,
                                 base_gemm_packed_avx512.cpp) from this many rows, its dot-product
                                 tiles below
    cuda_kernel        ["auto"]  "simt" (CUDA cores) or "mma" (tensor cores) forces a CUDA path

Each is read once from the environment variable LORA_EXT_<NAME> (for example
LORA_EXT_CPU_ISA=portable, LORA_EXT_CPU_FUSED_LINEAR=off) when the module loads, and changed
here at run time. Settings are process-wide: a change affects calls from every thread.

    with lora_ext.kernel_config.configured(cpu_fused_linear=False):
        with lora_ext.kernel_config.paths_taken() as taken:
            model(...)
    taken["cpu_linear_unfused"]  # how many calls took that path inside the block
"""

from contextlib import contextmanager

import torch

from lora_ext._native import native_available, native_error

__all__ = ["settings", "configure", "configured", "path_counts", "reset_path_counts", "paths_taken",
           "linear_lora_fuses"]


def _ops():
    if not native_available():
        raise RuntimeError(f"lora_ext: kernel settings need the native module, which did not load: {native_error()}")
    return torch.ops.lora_ext


def _from_text(text):
    if text in ("on", "off"):
        return text == "on"
    return int(text) if text.isdigit() else text


def _to_text(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def settings():
    """{name: value} of every kernel setting now."""
    names, values = _ops().get_kernel_config()
    return {name: _from_text(value) for name, value in zip(names, values)}


def configure(**changes):
    """Changes settings (see the module docstring); returns their previous values. A bad name or
    value raises ValueError and changes nothing."""
    ops = _ops()
    previous = settings()
    unknown = sorted(set(changes) - set(previous))
    if unknown:
        ops.set_kernel_config(unknown[0], "")  # raises the C++ error that lists the settings
    applied = {}
    try:
        for name, value in changes.items():
            ops.set_kernel_config(name, _to_text(value))
            applied[name] = previous[name]
    except Exception:
        for name, value in applied.items():
            ops.set_kernel_config(name, _to_text(value))
        raise
    return {name: previous[name] for name in changes}


@contextmanager
def configured(**changes):
    """Settings changed inside the block, restored after it."""
    previous = configure(**changes)
    try:
        yield
    finally:
        configure(**previous)


def path_counts():
    """{path: calls that took it} since the module loaded or reset_path_counts()."""
    names, counts = _ops().kernel_path_counts()
    return dict(zip(names, counts))


def reset_path_counts():
    _ops().reset_kernel_path_counts()


@contextmanager
def paths_taken():
    """A dict filled, when the block ends, with the paths taken inside it ({path: calls}, only
    paths that ran)."""
    before = path_counts()
    taken = {}
    try:
        yield taken
    finally:
        after = path_counts()
        taken.update({name: after[name] - before[name] for name in after if after[name] > before[name]})


def linear_lora_fuses(rows, d_in, dtype):
    """Whether linear_lora on CPU runs the base GEMM and the deltas fused for `rows` rows of width
    `d_in` in `dtype` on this machine with the current settings (the fusion rule of
    csrc/cpu/linear_lora_cpu.cpp; a call also needs unit strides and every slot on the item path)."""
    return bool(_ops().linear_lora_fuses(rows, d_in, dtype))
