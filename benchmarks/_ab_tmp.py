"""Two values of one kernel setting, A/B in one process, on the matrix bench's decode cells.

    python benchmarks/ab_setting.py cpu_fused_linear_16bit on off --dtype bfloat16 --counts 1 8 32 64

The bench's model (lora_ext/bench/matrix_bench.py) with every linear patched and rank-16
adapters; for each decode cell (and prefill cell, with --prefill-counts), every round runs the unpatched model and the patched one under
value A and under value B (the order reversed every other round), so the two values see the same
machine state. Prints each value's overhead against the unpatched model and the median of the
per-round differences A - B with their quartiles: one patched model toggled in place, since two
identically built models measured up to 0.8 ms apart (benchmarks/NOTES.md).
"""

import argparse
import os
import contextlib
import statistics
import tempfile
import types

import torch

from lora_ext import kernel_config
from lora_ext.bench import matrix_bench
from lora_ext.bench.measure import keep_freed_memory, seconds
from lora_ext.bench.synthetic import build_default_model, make_adapters


def setting_value(text):
    return {"on": True, "off": False}.get(text, int(text) if text.isdigit() else text)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("setting")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--counts", type=int, nargs="*", default=[1, 8, 32, 64])
    p.add_argument("--prefill-counts", type=int, nargs="*", default=[],
                   help="prefill cells too: this many prompts of --prompt-len tokens, one adapter each")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    keep_freed_memory()
    cells = matrix_bench.build_cells(types.SimpleNamespace(
        dtypes=[args.dtype], counts=args.counts, prefill_dtypes=[args.dtype] if args.prefill_counts else [],
        prefill_counts=args.prefill_counts, prompt_len=args.prompt_len, compile=False))
    settings = {"base": {}, "A": {args.setting: setting_value(args.a)}, "B": {args.setting: setting_value(args.b)}}
    print(f"{args.setting}: A = {args.a}, B = {args.b}; {args.dtype}; {torch.get_num_threads()} threads; "
          f"{args.rounds} rounds; overheads in ms per forward")
    with tempfile.TemporaryDirectory() as workdir, torch.no_grad():
        names = [f"lora{i}" for i in range(max(args.counts + args.prefill_counts))]
        template = build_default_model(torch.float32, "cpu")
        paths = dict(zip(names, make_adapters(template, workdir, len(names), [matrix_bench.RANK], prefix="lora").values()))
        base, mm = matrix_bench.build_models(types.SimpleNamespace(device="cpu"), args.dtype, paths)
        for cell in cells:
            kwargs, row_names = matrix_bench.cell_inputs(cell, base.config.vocab_size, "cpu", names)
            calls = {"base": lambda: base(**kwargs), "A": lambda: mm(adapter_names=row_names, **kwargs),
                     "B": lambda: mm(adapter_names=row_names, **kwargs)}
            times = {key: [] for key in calls}
            for i in range(args.rounds + 1):  # the first round warms up
                for key in (["base", "A", "B"] if i % 2 == 0 else ["B", "A", "base"]):
                    os.environ["AMXPF"] = {"base": "0", "A": args.a, "B": args.b}[key]
                    with contextlib.nullcontext():
                        elapsed = seconds(calls[key])[1] * 1e3
                    if i > 0:
                        times[key].append(elapsed)
            over = {key: [t - b for t, b in zip(times[key], times["base"])] for key in ("A", "B")}
            diff = [a - b for a, b in zip(times["A"], times["B"])]
            q1, _, q3 = statistics.quantiles(diff, n=4)
            print(f"{cell.label:34s} rows {len(cell.row_adapters):3d}  base {statistics.median(times['base']):7.2f}  "
                  f"A {statistics.median(over['A']):7.3f}  B {statistics.median(over['B']):7.3f}  "
                  f"A - B {statistics.median(diff):7.3f} ({q1:.3f}, {q3:.3f})", flush=True)


if __name__ == "__main__":
    main()
