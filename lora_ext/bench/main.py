"""lora-ext bench: end-to-end multi-adapter serving throughput on one model, in one run.

Scenarios, all on the same model and prompts: the base model alone (the ceiling); lora_ext with
1, 8 and N distinct adapters in one batch, and a mixed-rank set; PEFT's own mixed batch
(adapter_names) on the same adapters; serving adapter by adapter (one forward pass per adapter);
one adapter merged into the base weights. A float32 check first compares greedy tokens of
lora_ext and PEFT for every row; a mismatch makes the command exit with status 1.
"""

import argparse
import os
import sys
import tempfile
import time

import torch

from lora_ext.bench import check, figures, report
from lora_ext.bench.fused_gemm import check_paths
from lora_ext.bench.measure import BandwidthProbe, machine_info, measure_bandwidth
from lora_ext.bench.runners import time_interleaved
from lora_ext.bench.scenarios import MIXED_RANKS, build_scenarios, merged_scenarios, timing_order
from lora_ext.bench.synthetic import DEFAULT_MODEL_CONFIG
from lora_ext.bench.workload import build_model, make_workload


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lora-ext bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local Hugging Face model directory (default: a built-in Llama config)")
    p.add_argument("--adapters", nargs="+", help="PEFT adapter directories (default: synthetic adapters)")
    p.add_argument("--num-adapters", type=int, default=32, help="distinct adapters in the largest batch")
    p.add_argument("--ranks", type=int, nargs="+", default=[16], help="ranks of the synthetic adapters")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=24, help="decode steps timed per repeat")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quick", action="store_true", help="shorter prompts, fewer tokens and repeats")
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT scenario and the PEFT token check")
    p.add_argument("--out", default="lora_ext_bench", help="folder for bench.json, bench.png and bench.txt")
    args = p.parse_args(argv)
    if args.quick:
        args.prompt_len, args.new_tokens, args.repeats = min(args.prompt_len, 32), min(args.new_tokens, 8), 1
    if args.adapters:  # the largest batch has every adapter given, or --num-adapters of them
        args.num_adapters = min(args.num_adapters, len(args.adapters))
    for name in ("num_adapters", "batch_size", "prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def run(args):
    """Setup, the correctness check, the timed scenarios, the report. Returns the exit status."""
    os.makedirs(args.out, exist_ok=True)  # fails now, not after the timing, if it cannot be made
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="lora_ext_bench_") as workdir:
        model = build_model(args, dtype)
        workload = make_workload(args, model, workdir, MIXED_RANKS)
        print_setup(args)
        bandwidth = measure_bandwidth(args.device)
        print(f"  measured memory bandwidth {bandwidth / 1e9:.1f} GB/s")
        correctness = check.check_tokens(workload)
        print("  greedy tokens, lora_ext vs PEFT (float32): " + check.describe(correctness))

        base_model = workload.model(dtype)  # an unpatched copy: the ceiling
        mm = workload.patched(model, list(workload.paths))
        scenarios = build_scenarios(args, workload, base_model, mm)
        kernel_paths = check_paths(scenarios, workload.ids, workload.mask)  # once, outside the timed rounds
        times, bandwidth_per_round, merged = time_scenarios(args, workload, scenarios, base_model, mm)
        rows = [figures.scenario_row(s, times[s.name], times[s.baseline], mm, bandwidth, args)
                for s in scenarios + [merged]]
    summary = figures.summarize(rows, args.num_adapters, bandwidth, bandwidth_per_round)
    result = dict(setup=machine_info(args.device), args=vars(args), model=args.model or DEFAULT_MODEL_CONFIG,
                  bandwidth_bytes_per_s=bandwidth, bandwidth_per_round_bytes_per_s=bandwidth_per_round,
                  correctness=correctness, kernel_paths=kernel_paths, rows=rows, summary=summary)
    text = "\n".join([report.format_table(rows), "", "columns:", report.column_help(), "", *summary["lines"],
                      *figures.paths_lines(kernel_paths)])
    print()
    print(text)
    report.write_outputs(args.out, result, text,
                         f"lora-ext bench: {args.device} {args.dtype}, batch {args.batch_size}, "
                         f"{args.num_adapters} adapters")
    print(f"\nwrote {args.out}/bench.json, bench.txt, bench.png")
    return exit_status(correctness, kernel_paths)


def print_setup(args):
    print(f"lora-ext bench: {args.model or 'built-in Llama ' + str(DEFAULT_MODEL_CONFIG)}")
    print(f"  device {args.device}, {args.dtype}, batch {args.batch_size} x prompt {args.prompt_len}, "
          f"{args.new_tokens} decode steps x {args.repeats} repeats (a third of the steps for the adapter-by-adapter "
          f"and PEFT baselines), {torch.get_num_threads()} threads")


def time_scenarios(args, workload, scenarios, base_model, mm):
    """The shared rounds, then the merged adapter's own rounds against the base model (merged
    weights change the model). Returns (times by scenario, bandwidth probed before each shared
    round, the merged scenario)."""
    from tqdm import tqdm

    progress = tqdm(total=(args.repeats + 1) * (len(scenarios) + 2), desc="rounds", file=sys.stderr, leave=False)
    times = time_interleaved(timing_order(scenarios, args.num_adapters), workload.ids, workload.mask, args.repeats,
                             args.device, progress, probe=BandwidthProbe(args.device))
    bandwidth_per_round = times.pop("probe")
    mm.merge_adapter(workload.main_names[0])
    try:
        merged = merged_scenarios(args, base_model, mm)
        times.update(time_interleaved(merged, workload.ids, workload.mask, args.repeats, args.device, progress))
        times.pop("probe")
    finally:
        mm.unmerge_adapter()
        progress.close()
    return times, bandwidth_per_round, merged[0]


def exit_status(correctness, kernel_paths):
    """1 when lora_ext and PEFT generated different tokens; kernel paths that differ from a
    scenario's claim are reported, not fatal (the figures are still measured)."""
    wrong_paths = [name for name, claim in kernel_paths.items() if not claim["ok"]]
    if wrong_paths:
        print(f"WARNING: kernel paths not as claimed in {wrong_paths}; see bench.json kernel_paths", file=sys.stderr)
    if correctness.get("checked") and not correctness["ok"]:
        print(f"ERROR: lora_ext and PEFT generated different tokens on rows {correctness['mismatched_rows']}",
              file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    argv = list(argv if argv is not None else sys.argv[1:])
    if any(a == "--tp" or a.startswith("--tp=") for a in argv):  # tensor parallelism, under torchrun
        from lora_ext.bench.tp_bench import main as tp_bench_main

        return tp_bench_main(argv)
    if "--kinds" in argv:  # DoRA and modules_to_save against plain LoRA and PEFT
        from lora_ext.bench.kinds_bench import main as kinds_bench_main

        return kinds_bench_main(argv)
    if "--matrix" in argv:  # the overhead of every adapter mix and dtype against its floor
        from lora_ext.bench.matrix_bench import main as matrix_bench_main

        return matrix_bench_main(argv)
    if "--train" in argv:  # the training benchmark has its own options
        from lora_ext.bench.train_bench import main as train_bench_main

        return train_bench_main(argv)
    args = parse_args(argv)
    started = time.perf_counter()
    code = run(args)
    print(f"total time {time.perf_counter() - started:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
