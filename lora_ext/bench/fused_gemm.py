"""The fused base GEMM inside the model, so that the benchmark can report the LoRA work alone.

On CPU, for float32 decode batches, every patched nn.Linear runs `linear_lora`: the base GEMM and
the rows' deltas in one op, with lora_ext's own GEMM for these skinny shapes. The step's overhead
over the unpatched model is then the LoRA work minus what that GEMM saves against ATen's. Timing
the same patched model with the op running but no row on an adapter, in the same rounds, splits
the two: LoRA work = step with adapters - step with the op and no adapter rows.

Which layers fuse is the C++ rule's answer (lora_ext.kernel_config.linear_lora_fuses), asked for
each layer's width and the decode batch; paths_taken() checks afterwards what really ran.
"""

import torch

import lora_ext
from lora_ext.model.batch import BatchRows, active_batch

FUSED, UNFUSED = "cpu_linear_fused", "cpu_linear_unfused"  # linear_lora's CPU paths (kernel_config)


def op_layers(mm):
    """Patched layers that call linear_lora on CPU: a plain nn.Linear base layer on the CPU."""
    return [layer for layer in mm.layers.values()
            if type(layer.base_layer) is torch.nn.Linear and layer.device.type == "cpu"]


def fused_layers(mm, rows):
    """The op layers whose linear_lora fuses a batch of `rows` rows (the C++ fusion rule, with the
    kernel settings now); none without the native module."""
    if not lora_ext.native_available():
        return []
    return [layer for layer in op_layers(mm)
            if lora_ext.kernel_config.linear_lora_fuses(rows, layer.in_features, layer.dtype)]


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


def paths_of_one_step(scenario, ids, mask):
    """{kernel path: calls} that one decode step of `scenario` took (prefill outside the count),
    under the scenario's kernel settings."""
    with torch.no_grad(), scenario.settings():
        state = scenario.runner.prefill(ids, mask)
        with lora_ext.kernel_config.paths_taken() as taken:
            scenario.runner.step(state)
    return dict(taken)


def check_paths(scenarios, ids, mask):
    """For each scenario that claims kernel paths: {name: {claimed, taken, ok}}, ok when every
    claimed path ran exactly as many times as claimed in one decode step."""
    checks = {}
    for scenario in scenarios:
        if scenario.claimed_paths:
            taken = paths_of_one_step(scenario, ids, mask)
            checks[scenario.name] = dict(claimed=scenario.claimed_paths, taken=taken,
                                         ok=all(taken.get(p, 0) == n for p, n in scenario.claimed_paths.items()))
    return checks
