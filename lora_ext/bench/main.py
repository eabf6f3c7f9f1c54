"""lora-ext bench: end-to-end multi-adapter serving throughput on one model, in one run.

Scenarios, all on the same model and prompts: the base model alone (the ceiling); lora_ext with
1, 8 and N distinct adapters in one batch, and a mixed-rank set; PEFT's own mixed batch
(adapter_names) on the same adapters; serving adapter by adapter (one forward pass per adapter);
one adapter merged into the base weights. A float32 check first compares greedy tokens of
lora_ext and PEFT for every row; a mismatch makes the command exit with status 1.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

import lora_ext
from lora_ext.adapters.peft_format import read_config
from lora_ext.bench import report
from lora_ext.bench.fused_gemm import fusable_layers, op_without_adapters
from lora_ext.bench.measure import BandwidthProbe, machine_info, measure_bandwidth
from lora_ext.bench.runners import BatchRunner, SplitRunner, time_interleaved
from lora_ext.bench.synthetic import DEFAULT_MODEL_CONFIG, build_default_model, load_local_model, make_adapters

MIXED_RANKS = (8, 16, 32, 64)
NO_FUSION = "LORA_EXT_CPU_NO_FUSED_LINEAR"  # turns off linear_lora's fused CPU path
FUSED_MAX_ROWS = 64  # linear_lora fuses at most this many rows (csrc/cpu/linear_lora_cpu.cpp)
GEMM_ONLY = "lora_ext op, no adapter rows"  # the fused base GEMM alone, in the model
BASE_SCENARIO = "base model (no adapters)"  # the ceiling every overhead is measured against


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
    for name in ("num_adapters", "batch_size", "prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def build_model(args, dtype):
    if args.model:
        return load_local_model(args.model, dtype, args.device)
    return build_default_model(dtype, args.device)


def prompts(args, vocab_size):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab_size, (args.batch_size, args.prompt_len), generator=g)
    return ids.to(args.device), torch.ones_like(ids).to(args.device)


def row_names(names, batch_size):
    return [names[i % len(names)] for i in range(batch_size)]


def adapter_bytes_per_step(mm, names):
    """Bytes of adapter weights one decode step must read: each distinct adapter's A and B once."""
    total = 0
    for name in set(names):
        for module, rank in mm.store.record(name).ranks.items():
            layer = mm.layers[module]
            total += rank * (layer.in_features + layer.out_features) * layer.lora_a.element_size()
    return total


def peft_model(model, paths):
    from peft import PeftModel

    names = list(paths)
    peft = PeftModel.from_pretrained(model, paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(paths[name], adapter_name=name)
    return peft.eval()


def check_tokens(args, paths, names, ids, mask):
    """Greedy tokens of lora_ext against PEFT for every row, in float32. Returns a result dict."""
    try:
        import peft  # noqa: F401  (only to know whether it is installed)
    except ImportError:
        return dict(checked=False, reason="peft is not installed")
    new = min(args.new_tokens, 8)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    mm = lora_ext.patch_model(build_model(args, torch.float32), max_adapters=len(set(names)),
                              max_rank=max_rank_of(paths))
    for name in set(names):
        mm.load_adapter(name, paths[name])
    ours = mm.generate(adapter_names=names, **kwargs)
    reference = peft_model(build_model(args, torch.float32), {n: paths[n] for n in dict.fromkeys(names)}).generate(
        adapter_names=names, **kwargs)
    same = (ours == reference).all(dim=1)
    return dict(checked=True, dtype="float32", rows=len(names), new_tokens=new, rows_matching=int(same.sum()),
                mismatched_rows=[int(i) for i in (~same).nonzero().flatten()], ok=bool(same.all()))


def max_rank_of(paths):
    """The largest rank any adapter's config gives a module (r or rank_pattern); loading then checks
    that the weights agree, so the weights need not be read here."""
    ranks = []
    for name, path in paths.items():
        config = read_config(name, path)
        ranks += [config["r"], *(config.get("rank_pattern") or {}).values()]
    return max(ranks)


def run(args):
    dtype = getattr(torch, args.dtype)
    out_dir = report.ensure_dir(args.out)
    workdir = tempfile.mkdtemp(prefix="lora_ext_bench_")
    from tqdm import tqdm

    model = build_model(args, dtype)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids, mask = prompts(args, vocab)
    if args.adapters:
        paths = {f"user{i}": d for i, d in enumerate(args.adapters)}
        main_names = list(paths)
        mixed_names = []
    else:
        paths = make_adapters(model, workdir, args.num_adapters, args.ranks, prefix="lora")
        main_names = list(paths)
        mixed = make_adapters(model, workdir, args.num_adapters, MIXED_RANKS, prefix="mixed")
        paths.update(mixed)
        mixed_names = list(mixed)
    n = args.num_adapters
    groups = [(batch_scenario(k), main_names[:k]) for k in sorted({1, min(8, n), n})]
    if mixed_names:
        groups.append((f"lora_ext {n} adapters, ranks {'/'.join(map(str, MIXED_RANKS))}", mixed_names[:n]))

    print(f"lora-ext bench: {args.model or 'built-in Llama ' + str(DEFAULT_MODEL_CONFIG)}")
    print(f"  device {args.device}, {args.dtype}, batch {args.batch_size} x prompt {args.prompt_len}, "
          f"{args.new_tokens} decode steps x {args.repeats} repeats (a third of the steps for the adapter-by-adapter "
          f"and PEFT baselines), {torch.get_num_threads()} threads")
    bandwidth = measure_bandwidth(args.device)
    print(f"  measured memory bandwidth {bandwidth / 1e9:.1f} GB/s")

    peft_wanted = not args.no_peft
    correctness = check_tokens(args, paths, row_names(main_names[:n], args.batch_size), ids, mask) if peft_wanted \
        else dict(checked=False, reason="--no-peft")
    print("  greedy tokens, lora_ext vs PEFT (float32): " + (
        f"{correctness['rows_matching']}/{correctness['rows']} rows identical" if correctness["checked"]
        else f"not checked ({correctness['reason']})"))

    base_model = build_model(args, dtype)  # an unpatched copy: the ceiling
    mm = lora_ext.patch_model(model, max_adapters=n, max_rank=max_rank_of(paths))
    for name, path in paths.items():
        mm.load_adapter(name, path)
    scenarios = build_scenarios(args, base_model, mm, groups, main_names[:n], paths, peft_wanted)

    progress = tqdm(total=(args.repeats + 1) * (len(scenarios) + 2), desc="rounds", file=sys.stderr, leave=False)
    steps_of = slow_baseline_steps(args, scenarios)
    times = time_interleaved(timing_order(scenarios, n), ids, mask, args.new_tokens, args.repeats, args.device,
                             progress, steps_of, probe=BandwidthProbe(args.device))
    bandwidth_per_round = times.pop("probe")
    # Merged weights change the model, so that scenario runs in rounds of its own, against the base.
    mm.merge_adapter(main_names[0])
    merged = "1 adapter merged into the base"
    times.update(time_interleaved({merged: BatchRunner(lambda **kw: mm(**kw)),
                                   "base (merged rounds)": BatchRunner(base_model)},
                                  ids, mask, args.new_tokens, args.repeats, args.device, progress))
    times.pop("probe")
    mm.unmerge_adapter()
    progress.close()
    scenarios[merged] = ("merged", None, [])
    rows = [scenario_row(name, kind, names, times[name], times[base_key(kind)], mm, bandwidth, args)
            for name, (kind, _, names) in scenarios.items()]
    for row in rows:
        row["decode_steps_per_round"] = steps_of.get(row["scenario"], args.new_tokens)
    summary = summarize(rows, n, bandwidth, bandwidth_per_round)
    result = dict(setup=machine_info(args.device), args=vars(args), model=args.model or DEFAULT_MODEL_CONFIG,
                  bandwidth_bytes_per_s=bandwidth, bandwidth_per_round_bytes_per_s=bandwidth_per_round,
                  correctness=correctness, rows=rows, summary=summary)
    table = report.format_table(rows)
    text = "\n".join([table, "", "columns:", report.column_help(), "", *summary["lines"]])
    print()
    print(text)
    report.write_json(os.path.join(out_dir, "bench.json"), result)
    with open(os.path.join(out_dir, "bench.txt"), "w") as f:
        f.write(text + "\n")
    report.write_plot(os.path.join(out_dir, "bench.png"), rows,
                      f"lora-ext bench: {args.device} {args.dtype}, batch {args.batch_size}, {n} adapters")
    print(f"\nwrote {out_dir}/bench.json, bench.txt, bench.png")
    if correctness.get("checked") and not correctness["ok"]:
        print(f"ERROR: lora_ext and PEFT generated different tokens on rows {correctness['mismatched_rows']}",
              file=sys.stderr)
        return 1
    return 0


def build_scenarios(args, base_model, mm, groups, names, paths, peft_wanted):
    """{scenario: (kind, runner, adapter name of each row)} for everything timed in shared rounds."""
    scenarios = {BASE_SCENARIO: ("base", BatchRunner(base_model), [])}
    for scenario, group in groups:
        per_row = row_names(group, args.batch_size)
        scenarios[scenario] = ("lora_ext", BatchRunner(lambda _n=per_row, **kw: mm(adapter_names=_n, **kw)), per_row)
    per_row = row_names(names, args.batch_size)
    if fusable_layers(mm) and args.batch_size <= FUSED_MAX_ROWS:
        scenarios[GEMM_ONLY] = ("lora_ext", BatchRunner(op_without_adapters(mm, args.batch_size, args.device)), [])
        scenarios[f"lora_ext {len(names)} adapters, unfused"] = (
            "lora_ext", BatchRunner(without_fusion(lambda _n=per_row, **kw: mm(adapter_names=_n, **kw))), per_row)
    split = SplitRunner([(torch.tensor([i for i, x in enumerate(per_row) if x == name], device=args.device),
                          BatchRunner(lambda _n=name, _k=per_row.count(name), **kw: mm(adapter_names=[_n] * _k, **kw)))
                         for name in dict.fromkeys(per_row)])
    scenarios[f"adapter by adapter ({len(names)} passes)"] = ("split", split, per_row)
    if peft_wanted:
        peft = peft_model(build_model(args, base_model.dtype), {m: paths[m] for m in names})  # an unpatched copy
        scenarios[f"PEFT mixed batch, {len(names)} adapters"] = (
            "peft", BatchRunner(lambda _n=per_row, **kw: peft(adapter_names=_n, **kw)), per_row)
    return scenarios


def batch_scenario(k):
    """The name of the scenario that serves the batch with k distinct adapters through lora_ext."""
    return f"lora_ext {k} adapter{'s' if k > 1 else ''}"


def timing_order(scenarios, n):
    """{name: runner} in the order each round runs them: the base model, the N-adapter batch the
    targets compare with it and the fused GEMM alone (next to each other, so the machine's drift
    between them is smallest), then the rest."""
    first = [BASE_SCENARIO, batch_scenario(n), GEMM_ONLY]
    order = first + [k for k in scenarios if k not in first]
    return {k: scenarios[k][1] for k in order if k in scenarios}


def slow_baseline_steps(args, scenarios):
    """Decode steps per round for the adapter-by-adapter and PEFT baselines: a third of the others'
    (at least 2). Their steps take 4-15x longer and vary little, so fewer of them keep the run near
    two minutes while the rounds that decide the overhead figures get more repeats."""
    steps = max(2, args.new_tokens // 3)
    return {name: steps for name, (kind, _, _) in scenarios.items() if kind in ("split", "peft")}


def without_fusion(call):
    """`call` with linear_lora's fused CPU path turned off: ATen's GEMM, then add_lora_."""
    def run(**kwargs):
        before = os.environ.get(NO_FUSION)
        os.environ[NO_FUSION] = "1"
        try:
            return call(**kwargs)
        finally:
            if before is None:
                del os.environ[NO_FUSION]
            else:
                os.environ[NO_FUSION] = before
    return run


def base_key(kind):
    return "base (merged rounds)" if kind == "merged" else BASE_SCENARIO


def scenario_row(name, kind, names, t, base, mm, bandwidth, args):
    """Medians over rounds; the overhead is the median of per-round differences with the base."""
    prefill_s, step_s = statistics.median(t["prefill"]), statistics.median(t["steps"])
    row = dict(scenario=name, kind=kind, adapters=len(set(names)), prefill_s=prefill_s, decode_step_s=step_s,
               decode_step_ms=step_s * 1e3, prefill_tokens_per_s=args.batch_size * args.prompt_len / prefill_s,
               decode_tokens_per_s=args.batch_size / step_s, step_ms_per_round=[x * 1e3 for x in t["step"]])
    if kind != "base":
        row["overhead_ms"] = statistics.median(a - b for a, b in zip(t["step"], base["step"])) * 1e3
    if names:
        row["adapter_bytes_per_step"] = adapter_bytes_per_step(mm, names)
        row["floor_ms"] = row["adapter_bytes_per_step"] / bandwidth * 1e3
        row["overhead_over_floor"] = row["overhead_ms"] / row["floor_ms"]
    return row


def summarize(rows, n, bandwidth=None, bandwidth_per_round=()):
    """The target figures, and the LoRA work alone where the fused-GEMM scenario ran: the N-adapter
    step minus the step of the same patched model with no adapter rows (median over rounds). Each
    figure comes with its range over the rounds, and the bandwidth probed before each round, so a
    reader sees how much a shared machine moved during the run."""
    by_name = {r["scenario"]: r for r in rows}
    ours = by_name.get(batch_scenario(n))
    gemm_only = by_name.get(GEMM_ONLY)
    base = by_name.get(BASE_SCENARIO)
    peft = next((r for r in rows if r["kind"] == "peft"), None)
    lines, figures = [], {}
    if ours is not None:
        figures["overhead_over_floor"] = ours.get("overhead_over_floor")
        lines.append(f"lora_ext, {n} distinct adapters: decode overhead {ours['overhead_ms']:.2f} ms/step = "
                     f"{ours.get('overhead_over_floor', float('nan')):.2f}x the adapter-streaming floor "
                     f"({ours.get('floor_ms', float('nan')):.2f} ms)" + _spread(ours, base))
    if ours is not None and gemm_only is not None and ours.get("floor_ms"):
        saving = -gemm_only["overhead_ms"]
        work = statistics.median(a - b for a, b in zip(ours["step_ms_per_round"], gemm_only["step_ms_per_round"]))
        figures.update(fused_gemm_saving_ms=saving, lora_work_ms=work, lora_work_over_floor=work / ours["floor_ms"])
        lines.append(f"  the same patched model with no adapter rows (lora_ext's base GEMM, no LoRA work) runs "
                     f"{saving:.2f} ms/step {'faster' if saving >= 0 else 'slower'} than the base model, so the "
                     f"LoRA work alone costs {work:.2f} ms = {work / ours['floor_ms']:.2f}x the floor"
                     + _spread(ours, gemm_only))
    if ours is not None and peft is not None and peft["overhead_ms"] > 0:
        figures["overhead_vs_peft"] = ours["overhead_ms"] / peft["overhead_ms"]
        lines.append(f"PEFT mixed batch overhead {peft['overhead_ms']:.2f} ms/step: lora_ext's is "
                     f"{figures['overhead_vs_peft']:.3f} of it ({1 / max(figures['overhead_vs_peft'], 1e-9):.1f}x less)")
    if bandwidth and bandwidth_per_round:
        lines.append(f"memory bandwidth: {bandwidth / 1e9:.1f} GB/s at the start (the floor's), "
                     f"{min(bandwidth_per_round) / 1e9:.1f}-{max(bandwidth_per_round) / 1e9:.1f} GB/s in a short probe "
                     "before each round")
    figures["lines"] = lines
    return figures


def _spread(row, reference):
    """' (rounds: lo-hi ms)': the range over rounds of row's step minus reference's."""
    if reference is None:
        return ""
    diffs = [a - b for a, b in zip(row["step_ms_per_round"], reference["step_ms_per_round"])]
    return f" (rounds: {min(diffs):.2f} to {max(diffs):.2f} ms)"


def main(argv=None):
    args = parse_args(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    code = run(args)
    print(f"total time {time.perf_counter() - started:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
