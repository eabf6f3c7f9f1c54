"""How much of lora_ext's decode step is saved by computing each layer's base GEMM itself.

On CPU, for float32 decode batches, every patched nn.Linear runs `linear_lora`: the base GEMM and
the rows' deltas in one op, with lora_ext's own GEMM for these skinny shapes. The step's overhead
over the unpatched model is then the LoRA work minus what that GEMM saves against ATen's. This
module measures the saving on the model's own layers, so the benchmark can report the LoRA work
alone as well.
"""

import statistics
import time

import torch

from lora_ext import ops


def fusable_layers(mm):
    return [layer for layer in mm.layers.values()
            if type(layer.base_layer) is torch.nn.Linear and layer.dtype == torch.float32
            and layer.lora_a.device.type == "cpu"]


def gemm_saving_ms(mm, rows, repeats=15):
    """Median over repeats of (ATen's GEMMs - lora_ext's fused GEMMs) for one pass over every fusable
    layer with `rows` input rows and no adapter rows, in milliseconds (about 0 where the op does not
    fuse that many rows); None if no layer can fuse."""
    layers = fusable_layers(mm)
    if not layers:
        return None
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(rows, layer.in_features, generator=g) for layer in layers]
    no_adapter = torch.full((rows,), -1, dtype=torch.long)
    plan = ops.build_plan(no_adapter, mm.max_adapters)

    def aten():
        for layer, x in zip(layers, inputs):
            torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)

    def fused():
        for layer, x in zip(layers, inputs):
            ops.linear_lora(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_a, layer.lora_b,
                            no_adapter, layer.scales, layer.ranks, plan)

    def seconds(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    savings = []
    with torch.no_grad():
        for repeat in range(repeats + 1):  # the order alternates, so neither finds the other's weights cached
            if repeat % 2:
                t_fused = seconds(fused)
                t_aten = seconds(aten)
            else:
                t_aten = seconds(aten)
                t_fused = seconds(fused)
            savings.append(t_aten - t_fused)
    return statistics.median(savings[1:]) * 1e3
