"""The fused base GEMM inside the model, so that the benchmark can report the LoRA work alone.

On CPU, for float32 decode batches, every patched nn.Linear runs `linear_lora`: the base GEMM and
the rows' deltas in one op, with lora_ext's own GEMM for these skinny shapes. The step's overhead
over the unpatched model is then the LoRA work minus what that GEMM saves against ATen's. Timing
the same patched model with the op running but no row on an adapter, in the same rounds, splits
the two: LoRA work = step with adapters - step with the op and no adapter rows.
"""

import torch

from lora_ext.model.batch import BatchRows, active_batch


def fusable_layers(mm):
    return [layer for layer in mm.layers.values()
            if type(layer.base_layer) is torch.nn.Linear and layer.dtype == torch.float32
            and layer.lora_a.device.type == "cpu"]


def op_without_adapters(mm, batch_size, device):
    """A model call for the patched model in which every row uses the base weights but each patched
    layer still calls linear_lora (a batch without adapters normally skips the op): lora_ext's own
    GEMM in the model, with no LoRA work."""
    rows = BatchRows(mm, torch.full((batch_size,), -1, dtype=torch.long, device=device), mm.max_adapters,
                     any_adapter=True)

    def call(**kwargs):
        with torch.no_grad(), active_batch(rows):
            return mm.model(**kwargs)
    return call
