"""The ways of serving the batch that the benchmark times, all on the same model and prompts.

    base model (no adapters)        the unpatched model: the ceiling every overhead is measured against
    lora_ext k adapter(s)           the patched model, k distinct adapters over the rows (1, 8, N)
    lora_ext N adapters, ranks ...  N adapters of mixed ranks (synthetic adapters only)
    lora_ext op, no adapter rows    every row on the base weights, each layer still in linear_lora
    lora_ext N adapters, unfused    linear_lora's fused CPU path off: ATen's GEMM, then add_lora_
    adapter by adapter (N passes)   one forward pass per adapter, as one-adapter-per-model servers do
    PEFT mixed batch, N adapters    PEFT's adapter_names on the same adapters
    1 adapter merged into the base  merge_adapter, timed in rounds of its own against the base

The "op, no adapter rows" and "unfused" scenarios run only where linear_lora fuses the decode
batch in some layer (CPU, float32); they and the N-adapter batch claim which linear_lora path
each layer takes, which the benchmark checks once with kernel_config.paths_taken().
"""

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

import lora_ext
from lora_ext.bench.fused_gemm import FUSED, UNFUSED, fused_layers, op_layers, op_without_adapters
from lora_ext.bench.runners import BatchRunner, SplitRunner
from lora_ext.bench.workload import peft_model, row_names

BASE_SCENARIO = "base model (no adapters)"  # the label of the ceiling every overhead is measured against
MERGED_BASE = "base (merged rounds)"  # the base model again, timed in the merged scenario's rounds
GEMM_ONLY = "lora_ext op, no adapter rows"  # the fused base GEMM alone, in the model
MERGED = "1 adapter merged into the base"
MIXED_RANKS = (8, 16, 32, 64)
# The adapter-by-adapter and PEFT baselines decode a third of the others' steps per round (at
# least 2): their steps are several times longer and vary little, so fewer of them keep the run
# short while the rounds that decide the overhead figures get more repeats.
SLOW_STEP_DIVISOR = 3


@dataclass
class Scenario:
    name: str            # its label in the table
    kind: str            # "base", "lora_ext", "split", "peft" or "merged": its role and colour
    runner: object       # a BatchRunner or SplitRunner
    adapter_names: list  # the adapter of each batch row; [] when no row uses an adapter
    steps: int           # decode steps timed per round
    kernel_settings: dict = field(default_factory=dict)  # lora_ext.kernel_config settings while it runs
    claimed_paths: dict = field(default_factory=dict)    # {kernel path: calls} one decode step should take
    baseline: str = BASE_SCENARIO  # the scenario its overhead is measured against

    def settings(self):
        """A context manager holding the scenario's kernel settings."""
        return lora_ext.kernel_config.configured(**self.kernel_settings) if self.kernel_settings else nullcontext()


def batch_scenario(k):
    """The name of the scenario that serves the batch with k distinct adapters through lora_ext."""
    return f"lora_ext {k} adapter{'s' if k > 1 else ''}"


def mixed_scenario(n):
    return f"lora_ext {n} adapters, ranks {'/'.join(map(str, MIXED_RANKS))}"


def build_scenarios(args, workload, base_model, mm):
    """Everything timed in shared rounds, in the table's order (timing_order gives the rounds')."""
    n, batch = args.num_adapters, args.batch_size
    names = workload.main_names[:n]
    per_row = row_names(names, batch)

    def lora_ext_batch(name, adapters, **extra):
        rows = row_names(adapters, batch)
        return Scenario(name, "lora_ext", BatchRunner(lambda _n=rows, **kw: mm(adapter_names=_n, **kw), mm.model),
                        rows, args.new_tokens, **extra)

    fused, ops = len(fused_layers(mm, batch)), len(op_layers(mm))
    fused_claim = {FUSED: fused, UNFUSED: ops - fused} if fused else {}
    scenarios = [Scenario(BASE_SCENARIO, "base", BatchRunner(base_model, base_model), [], args.new_tokens)]
    scenarios += [lora_ext_batch(batch_scenario(k), names[:k], claimed_paths=fused_claim if k == n else {})
                  for k in sorted({1, min(8, n), n})]
    if workload.mixed_names:
        scenarios.append(lora_ext_batch(mixed_scenario(n), workload.mixed_names[:n]))
    if fused:
        scenarios.append(Scenario(GEMM_ONLY, "lora_ext", BatchRunner(op_without_adapters(mm, batch, args.device),
                                                                     mm.model), [], args.new_tokens,
                                  claimed_paths=fused_claim))
        scenarios.append(lora_ext_batch(f"lora_ext {n} adapters, unfused", names,
                                        kernel_settings=dict(cpu_fused_linear=False),
                                        claimed_paths={FUSED: 0, UNFUSED: ops}))
    slow_steps = max(2, args.new_tokens // SLOW_STEP_DIVISOR)
    scenarios.append(Scenario(f"adapter by adapter ({n} passes)", "split", split_runner(mm, per_row, args.device),
                              per_row, slow_steps))
    if not args.no_peft:
        peft_base = workload.model(base_model.dtype)  # an unpatched copy for PEFT to wrap
        peft = peft_model(peft_base, {m: workload.paths[m] for m in names})
        scenarios.append(Scenario(f"PEFT mixed batch, {n} adapters", "peft",
                                  BatchRunner(lambda _n=per_row, **kw: peft(adapter_names=_n, **kw), peft_base),
                                  per_row, slow_steps))
    return scenarios


def timing_order(scenarios, n):
    """The scenarios in the order each round runs them: the base model, the N-adapter batch the
    targets compare with it and the fused GEMM alone (next to each other, so that the machine's
    drift between them is smallest), then the rest."""
    first = [BASE_SCENARIO, batch_scenario(n), GEMM_ONLY]
    return sorted(scenarios, key=lambda s: first.index(s.name) if s.name in first else len(first))


def split_runner(mm, per_row, device):
    """One pass per adapter over the rows that use it."""
    return SplitRunner([(torch.tensor([i for i, x in enumerate(per_row) if x == name], device=device),
                         BatchRunner(lambda _n=name, _k=per_row.count(name), **kw: mm(adapter_names=[_n] * _k, **kw),
                                     mm.model))
                        for name in dict.fromkeys(per_row)])


def merged_scenarios(args, base_model, mm):
    """The merged adapter and the base model, for rounds of their own: merged weights change the
    model, so this pair cannot share rounds with the others. Call inside mm's merged state."""
    return [Scenario(MERGED, "merged", BatchRunner(lambda **kw: mm(**kw), mm.model), [], args.new_tokens,
                     baseline=MERGED_BASE),
            Scenario(MERGED_BASE, "base", BatchRunner(base_model, base_model), [], args.new_tokens)]
