"""The figures of a run: one row per scenario, and the summary of the targets.

Every overhead is a median of per-round differences with the scenario's baseline (the scenarios
run interleaved, so a round's difference compares runs that saw the same machine). The floor is
the time to stream the adapter bytes one decode step must read, at the bandwidth measured at the
start of the run.
"""

import statistics

from lora_ext.bench.scenarios import BASE_SCENARIO, GEMM_ONLY, batch_scenario


def adapter_bytes_per_step(mm, names):
    """Bytes of adapter weights one decode step must read: each distinct adapter's A and B once."""
    return sum(mm.store.adapter_bytes(name) for name in set(names))


def per_round_differences(row, reference):
    """The row's median step minus the reference's, round by round, in ms."""
    return [a - b for a, b in zip(row["step_ms_per_round"], reference["step_ms_per_round"])]


def scenario_row(scenario, t, base, mm, bandwidth, args):
    """Medians: prefill over rounds, the step over all steps of all rounds, and per round (whose
    differences with the baseline's, round by round, give the overhead: their median). Every
    step's time is kept in the row (step_ms_by_round)."""
    step_ms_by_round = [[x * 1e3 for x in steps] for steps in t["steps"]]
    prefill_s = statistics.median(t["prefill"])
    step_s = statistics.median(x for steps in t["steps"] for x in steps)
    row = dict(scenario=scenario.name, kind=scenario.kind, adapters=len(set(scenario.adapter_names)),
               prefill_s=prefill_s, decode_step_s=step_s, decode_step_ms=step_s * 1e3,
               prefill_tokens_per_s=args.batch_size * args.prompt_len / prefill_s,
               decode_tokens_per_s=args.batch_size / step_s, decode_steps_per_round=scenario.steps,
               step_ms_per_round=[statistics.median(steps) for steps in step_ms_by_round],
               step_ms_by_round=step_ms_by_round)
    if scenario.kind != "base":
        row["overhead_ms"] = statistics.median(
            a - b for a, b in zip(row["step_ms_per_round"], [statistics.median(s) * 1e3 for s in base["steps"]]))
    if scenario.adapter_names:
        row["adapter_bytes_per_step"] = adapter_bytes_per_step(mm, scenario.adapter_names)
        row["floor_ms"] = row["adapter_bytes_per_step"] / bandwidth * 1e3
        row["overhead_over_floor"] = row["overhead_ms"] / row["floor_ms"]
    return row


def summarize(rows, n, bandwidth=None, bandwidth_per_round=()):
    """The target figures, and the LoRA work alone where the fused-GEMM scenario ran: the N-adapter
    step minus the step of the same patched model with no adapter rows (median over rounds). Each
    figure comes with its range over the rounds, and the bandwidth probed before each round, so a
    reader sees how much a shared machine moved during the run."""
    by_name = {r["scenario"]: r for r in rows}
    ours, gemm_only, base = by_name.get(batch_scenario(n)), by_name.get(GEMM_ONLY), by_name.get(BASE_SCENARIO)
    peft = next((r for r in rows if r["kind"] == "peft"), None)
    lines, figures = [], {}
    if ours is not None:
        figures["overhead_over_floor"] = ours.get("overhead_over_floor")
        lines.append(f"lora_ext, {n} distinct adapters: decode overhead {ours['overhead_ms']:.2f} ms/step = "
                     f"{ours.get('overhead_over_floor', float('nan')):.2f}x the adapter-streaming floor "
                     f"({ours.get('floor_ms', float('nan')):.2f} ms)" + _spread(ours, base))
    if ours is not None and gemm_only is not None and ours.get("floor_ms"):
        saving = -gemm_only["overhead_ms"]
        work = statistics.median(per_round_differences(ours, gemm_only))
        figures.update(fused_gemm_saving_ms=saving, lora_work_ms=work, lora_work_over_floor=work / ours["floor_ms"])
        lines.append(f"  the same patched model with no adapter rows (lora_ext's base GEMM, no LoRA work) runs "
                     f"{abs(saving):.2f} ms/step {'faster' if saving >= 0 else 'slower'} than the base model, so the "
                     f"LoRA work alone costs {work:.2f} ms = {work / ours['floor_ms']:.2f}x the floor"
                     + _spread(ours, gemm_only))
    if ours is not None and peft is not None and peft["overhead_ms"] > 0:
        figures["overhead_vs_peft"] = ours["overhead_ms"] / peft["overhead_ms"]
        ratio = figures["overhead_vs_peft"]
        lines.append(f"PEFT mixed batch overhead {peft['overhead_ms']:.2f} ms/step: lora_ext's is {ratio:.3f} of it"
                     + (f" ({1 / ratio:.1f}x less)" if ratio > 0 else ""))
    if bandwidth and bandwidth_per_round:
        lines.append(f"memory bandwidth: {bandwidth / 1e9:.1f} GB/s at the start (the floor's), "
                     f"{min(bandwidth_per_round) / 1e9:.1f}-{max(bandwidth_per_round) / 1e9:.1f} GB/s in a short probe "
                     "before each round")
    figures["lines"] = lines
    return figures


def paths_lines(checks):
    """One line per scenario whose kernel paths were checked."""
    lines = []
    for name, check in checks.items():
        taken = ", ".join(f"{path} x{calls}" for path, calls in sorted(check["taken"].items())) or "no counted path"
        verdict = "as claimed" if check["ok"] else "NOT as claimed: " + ", ".join(
            f"{path} x{calls}" for path, calls in check["claimed"].items())
        lines.append(f"  {name}: {taken} ({verdict})")
    return ["kernel paths of one decode step:", *lines] if lines else []


def _spread(row, reference):
    """' (rounds: lo to hi ms)': the range over rounds of row's step minus reference's."""
    if reference is None:
        return ""
    diffs = per_round_differences(row, reference)
    return f" (rounds: {min(diffs):.2f} to {max(diffs):.2f} ms)"
