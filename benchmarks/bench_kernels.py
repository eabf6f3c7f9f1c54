"""Kernel benchmark: lora_ext's grouped LoRA op against baselines and the memory limit, one run.

    python benchmarks/bench_kernels.py --device cuda --out benchmarks/results/kernels_h100.json
    python benchmarks/bench_kernels.py --device cpu --quick

Every case times add_lora_ (out += delta: what a patched layer runs) on argument sets rotated so
that the working set exceeds the last-level cache (the "cold" figure, as successive layers
would see it), and once on a single set (the "hot" figure). Baselines timed in the same run:
  loop     one matmul pair per adapter present (PEFT's way)
  gather   gather each row's A and B, then einsum (CPU) or batched matmul (CUDA): vLLM's torch path
  dense    one torch.mm pair with a single adapter's weights for all rows (the best case)
  ref      lora_ext.reference (float32 reference of the contract)
The limit: minimum bytes (each used adapter's weights once, x once, out read and written) over
the bandwidth measured here (CPU: a streaming read; CUDA: device-to-device copy, read + write).
"""

import argparse
import math
import os
from dataclasses import asdict, dataclass, field

import torch

import lora_ext
from lora_ext import atomic
from lora_ext.bench.distributions import slot_ids_for, uniform_groups
from lora_ext.bench.measure import cuda_event_seconds, machine_info, measure_bandwidth, median_seconds
from lora_ext.reference import lora_delta_ref


@dataclass
class Case:
    name: str
    rows: int
    d_in: int
    d_out: int
    ranks: tuple  # rank of each adapter, cycled over adapters
    distribution: str
    sort_rows: bool = False
    dtype: str = "bfloat16"
    baselines: tuple = ("loop", "gather", "dense", "ref")
    b_layout: str = "rank_major"  # how lora_b is stored: "rank_major" (S, R, d_out) as lora_ext's
    # model layer stores it, or "peft" (S, d_out, R); the op takes either
    extra: dict = field(default_factory=dict)


# ---- adapter distributions --------------------------------------------------------------------

def slot_ids(distribution, rows, generator):
    """(ids, number of adapters) for one of the cases' distributions over `rows` rows, drawn by
    lora_ext.bench.distributions (the op tests' module):
      identical  every row on one adapter
      distinct   one adapter per row, rows in random order
      uniform    about sqrt(rows) adapters, each row a random one of them
      zipf       as many adapters as rows, adapter k drawn with weight 1 / k^1.5
      groups8    8 adapters, each row a random one of them
      none30     distinct, then about 30% of the rows on the base model
      runsN      N adapters over N equal runs of consecutive rows (prefill)
    """
    if distribution.startswith("runs"):
        kind, adapters = "runs", int(distribution[4:])
    else:
        kind, adapters = {"identical": ("one_slot", 1), "distinct": ("shuffled", rows),
                          "uniform": ("unsorted", uniform_groups(rows)), "zipf": ("zipf", max(1, rows)),
                          "groups8": ("unsorted", 8), "none30": ("shuffled_with_none", rows)}[distribution]
    return slot_ids_for(kind, rows, adapters, generator), adapters


def make_set(case, device, generator):
    dtype = getattr(torch, case.dtype)
    ids, adapters = slot_ids(case.distribution, case.rows, generator)
    if case.sort_rows:
        ids = ids.sort().values
    ranks = torch.tensor([case.ranks[i % len(case.ranks)] for i in range(adapters)])
    max_rank = max(case.ranks)
    a = torch.randn(adapters, max_rank, case.d_in, generator=generator) / math.sqrt(case.d_in)
    b = torch.randn(adapters, case.d_out, max_rank, generator=generator) / math.sqrt(max_rank)
    x = torch.randn(case.rows, case.d_in, generator=generator)
    s = dict(x=x, lora_a=a, lora_b=b, slot_ids=ids, scales=torch.full((adapters,), 2.0), ranks=ranks)
    s = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and k != "scales" else v.dtype)
         for k, v in s.items()}
    if case.b_layout == "rank_major":
        s["lora_b"] = s["lora_b"].transpose(1, 2).contiguous().transpose(1, 2)
    s["out"] = torch.zeros(case.rows, case.d_out, device=device, dtype=dtype)
    s["plan"] = lora_ext.build_plan(s["slot_ids"], adapters)
    used = ids[ids >= 0].unique()
    s["used_rank_sum"] = int(ranks[used].sum()) if used.numel() else 0
    s["host_ids"] = ids
    s["host_ranks"] = ranks.tolist()
    s["host_scales"] = [2.0] * adapters
    return s


def min_bytes(case, s):
    """Fewest bytes the op must move: used weights once, x once, u twice, out read and written."""
    elem = torch.finfo(getattr(torch, case.dtype)).bits // 8
    weights = s["used_rank_sum"] * (case.d_in + case.d_out) * elem
    active = int((s["host_ids"] >= 0).sum())
    return weights + active * case.d_in * elem + 2 * case.rows * case.d_out * elem


def flops(case, s):
    ranks = s["ranks"].cpu()
    ids = s["host_ids"]
    per_row = torch.where(ids >= 0, ranks[ids.clamp(min=0)], torch.zeros_like(ids))
    return int(2 * per_row.sum() * (case.d_in + case.d_out))


# ---- the methods timed ------------------------------------------------------------------------

def run_lora_ext(s):
    lora_ext.add_lora_(s["out"], s["x"], s["lora_a"], s["lora_b"], s["slot_ids"], s["scales"], s["ranks"], s["plan"])


def run_loop(s):
    """One adapter at a time, as PEFT's mixed batches do."""
    ids = s["slot_ids"]
    for slot in ids.unique().tolist():
        if slot < 0:
            continue
        rows = (ids == slot).nonzero().squeeze(1)
        r = s["host_ranks"][slot]
        delta = (s["x"][rows] @ s["lora_a"][slot, :r].T) @ s["lora_b"][slot, :, :r].T
        s["out"].index_add_(0, rows, delta, alpha=s["host_scales"][slot])


def run_gather(s):
    """vLLM's torch path: gather every row's A and B (padded to the largest rank). On CPU it
    follows vLLM's CPU ops: the shrink converts the gathered weights to float32 and contracts with
    einsum into a float32 buffer, the expand contracts in the output dtype and adds. On CUDA the
    contractions are batched matmuls."""
    ids = s["slot_ids"].clamp(min=0)
    row_scale = (s["scales"][ids] * (s["slot_ids"] >= 0)).unsqueeze(1)
    a = s["lora_a"][ids]  # (T, R, d_in)
    b = s["lora_b"][ids]  # (T, d_out, R)
    if s["x"].is_cuda:
        u = torch.bmm(a, s["x"].unsqueeze(2)).squeeze(2) * row_scale.to(a.dtype)
        delta = torch.bmm(b, u.unsqueeze(2)).squeeze(2)
    else:
        u = torch.einsum("bi,boi->bo", s["x"].float(), a.float()) * row_scale
        delta = torch.einsum("bi,boi->bo", u.to(b.dtype), b)
    s["out"].add_(delta)


def run_dense(s):
    """The best case: every row uses one adapter, two plain matmuls."""
    r = s["host_ranks"][0]
    s["out"].add_((s["x"] @ s["lora_a"][0, :r].T) @ s["lora_b"][0, :, :r].T)


def run_ref(s):
    s["out"].add_(lora_delta_ref(s["x"], s["lora_a"], s["lora_b"], s["slot_ids"], s["scales"], s["ranks"]))


METHODS = {"lora_ext": run_lora_ext, "loop": run_loop, "gather": run_gather, "dense": run_dense, "ref": run_ref}
GRAPH_SAFE = {"lora_ext", "gather", "dense"}


# ---- cases ----------------------------------------------------------------------------------------

def build_cases(device, quick, dtypes):
    cases = []
    decode_rows = (1, 16, 64)
    prefill_rows, prefill_runs = (8192, 16) if device == "cuda" else (4096, 8)
    for dtype in dtypes:
        for d_in, d_out in ((4096, 4096), (4096, 11008)):
            for rank in (8, 16, 64):
                for rows in decode_rows:
                    if quick and (rank != 16 or d_out != 4096):
                        continue
                    cases.append(Case(f"decode T={rows} distinct", rows, d_in, d_out, (rank,), "distinct", dtype=dtype))
            if quick and d_out != 4096:
                continue
            for rank in (16, 64):
                cases.append(Case(f"prefill T={prefill_rows} in {prefill_runs} runs", prefill_rows, d_in, d_out,
                                  (rank,), f"runs{prefill_runs}", dtype=dtype, baselines=("loop", "dense")))
        if quick:
            continue
        # Distributions at decode, 4096 -> 4096, rank 16.
        for distribution in ("identical", "uniform", "zipf", "groups8", "none30"):
            for sort_rows in (False, True):
                cases.append(Case(f"decode T=64 {distribution}{' sorted' if sort_rows else ''}", 64, 4096, 4096,
                                  (16,), distribution, sort_rows, dtype=dtype))
        # B in PEFT's own layout, as a caller that stacks PEFT tensors unchanged would pass it.
        cases.append(Case("decode T=64 distinct, B in PEFT layout", 64, 4096, 4096, (16,), "distinct",
                          dtype=dtype, b_layout="peft"))
        # Mixed ranks in one launch against the same rows run rank by rank.
        cases.append(Case("decode T=64 mixed ranks {8,16,32,64}", 64, 4096, 4096, (8, 16, 32, 64),
                          "distinct", dtype=dtype, extra={"compare_rank_by_rank": True}))
    return cases


def rank_by_rank_time(case, sets, timer):
    """Time of the same rows split into one call per rank (each call a uniform-rank batch). All the
    calls of one argument set run back to back, so the rotation over sets (and the cold working
    set) is the same as for the mixed call."""
    split_sets = []
    for s in sets:
        calls = []
        for rank in sorted(set(case.ranks)):
            keep = (s["ranks"][s["slot_ids"].clamp(min=0)] == rank) & (s["slot_ids"] >= 0)
            rows = keep.nonzero().squeeze(1)
            sub = dict(s, x=s["x"][rows].contiguous(), slot_ids=s["slot_ids"][rows].contiguous(),
                       out=s["out"][rows].contiguous())
            sub["plan"] = lora_ext.build_plan(sub["slot_ids"], s["lora_a"].shape[0])
            calls.append(sub)
        split_sets.append(calls)
    return timer(lambda calls: [run_lora_ext(sub) for sub in calls], split_sets)


def set_count(case, s, device, cold_bytes):
    per_set = sum(v.numel() * v.element_size() for k, v in s.items()
                  if isinstance(v, torch.Tensor) and k in ("lora_a", "lora_b", "x", "out"))
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else 8 << 30
    return max(2, min(1024, math.ceil(cold_bytes / per_set), int(0.5 * free // per_set)))


def run_case(case, device, bandwidth, timer, cold_bytes):
    g = torch.Generator().manual_seed(0)
    first = make_set(case, device, g)
    sets = [first] + [make_set(case, device, g) for _ in range(set_count(case, first, device, cold_bytes) - 1)]
    row = dict(asdict(case), sets=len(sets), min_bytes=min_bytes(case, first), flops=flops(case, first))
    row["lora_ext_cold_s"] = timer(run_lora_ext, sets)
    row["lora_ext_hot_s"] = timer(run_lora_ext, sets[:1])
    if device == "cuda":
        row["lora_ext_eager_cold_s"] = cuda_event_seconds(run_lora_ext, sets, 10)
    row["floor_s"] = row["min_bytes"] / bandwidth
    row["share_of_bandwidth"] = row["floor_s"] / row["lora_ext_cold_s"]
    row["effective_gbps"] = row["min_bytes"] / row["lora_ext_cold_s"] / 1e9
    for name in case.baselines:
        baseline_timer = timer if (device == "cpu" or name in GRAPH_SAFE) else (lambda f, ss: cuda_event_seconds(f, ss, 5))
        row[f"{name}_s"] = baseline_timer(METHODS[name], sets[: max(2, len(sets) // 4)] if name in ("ref", "loop") else sets)
        row[f"speedup_vs_{name}"] = row[f"{name}_s"] / row["lora_ext_cold_s"]
    if case.extra.get("compare_rank_by_rank"):
        row["rank_by_rank_s"] = rank_by_rank_time(case, sets, timer)
        row["mixed_over_rank_by_rank"] = row["lora_ext_cold_s"] / row["rank_by_rank_s"]
    del sets
    return row


def print_table(rows, bandwidth):
    print(f"\nmeasured bandwidth: {bandwidth / 1e9:.1f} GB/s")
    header = f"{'case':44} {'dtype':8} {'in->out':12} {'r':>7} {'ours us':>9} {'hot us':>8} {'floor us':>9} {'%bw':>5}"
    header += f" {'x loop':>7} {'x gather':>8} {'x dense':>7} {'x ref':>7}"
    print(header)
    for r in rows:
        ranks = "/".join(str(k) for k in r["ranks"])
        line = (f"{r['name']:44} {r['dtype']:8} {str(r['d_in']) + '->' + str(r['d_out']):12} {ranks:>7} "
                f"{r['lora_ext_cold_s'] * 1e6:9.1f} {r['lora_ext_hot_s'] * 1e6:8.1f} {r['floor_s'] * 1e6:9.1f} "
                f"{100 * r['share_of_bandwidth']:5.0f}")
        for name in ("loop", "gather", "dense", "ref"):
            value = r.get(f"speedup_vs_{name}")
            line += f" {value:7.2f}" if value is not None else f" {'-':>7}"
        if "mixed_over_rank_by_rank" in r:
            line += f"  mixed/rank-by-rank {r['mixed_over_rank_by_rank']:.2f}"
        print(line)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: bfloat16 float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--quick", action="store_true", help="only rank 16, 4096 -> 4096")
    parser.add_argument("--filter", default="", help="only cases whose name contains this")
    parser.add_argument("--cold-mb", type=float, default=None, help="bytes of argument sets to rotate through")
    parser.add_argument("--min-time", type=float, default=0.3, help="CPU: seconds per timing")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtypes = args.dtypes or (["bfloat16", "float32"] if device == "cpu" else ["bfloat16"])
    cold_bytes = (args.cold_mb or (640 if device == "cpu" else 256)) * 2**20
    bandwidth = measure_bandwidth(device)
    if device == "cpu":  # median wall time per call, cycling through the sets
        timer = lambda fn, sets: median_seconds(fn, sets, min_time=args.min_time)  # noqa: E731
    else:  # median per call of a replayed CUDA graph of a pass over the sets
        timer = lambda fn, sets: cuda_event_seconds(fn, sets, 20, graph=True)  # noqa: E731
    rows = []
    for case in build_cases(device, args.quick, dtypes):
        if args.filter not in case.name:
            continue
        rows.append(run_case(case, device, bandwidth, timer, cold_bytes))
        r = rows[-1]
        print(f"{case.name} {case.dtype} {case.d_in}->{case.d_out} r={case.ranks}: {r['lora_ext_cold_s'] * 1e6:.1f} us "
              f"({100 * r['share_of_bandwidth']:.0f}% of bandwidth)", flush=True)
    print_table(rows, bandwidth)
    result = {"setup": machine_info(device), "device": device, "bandwidth_bytes_per_s": bandwidth,
              "cold_working_set_bytes": cold_bytes, "timing": "CUDA graph replay, median" if device == "cuda"
              else "perf_counter per call, median", "rows": rows}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic.write_json(args.out, result, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
