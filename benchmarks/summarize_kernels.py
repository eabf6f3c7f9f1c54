"""Prints a markdown summary of a bench_kernels.py JSON file: the setup, the table, and each
target of the CPU kernel issue checked against the numbers of that run.

    python benchmarks/summarize_kernels.py benchmarks/results/kernels_cpu_ci_machine.json
"""

import json
import sys


def find(rows, name, dtype, d_out=4096, ranks=None):
    for r in rows:
        if r["name"] == name and r["dtype"] == dtype and r["d_out"] == d_out and (ranks is None or r["ranks"] == ranks):
            return r
    return None


def main(path):
    data = json.load(open(path))
    s, rows = data["setup"], data["rows"]
    print(f"Machine: {s.get('cpu', s.get('gpu'))}, {s['threads']} threads; torch {s['torch']}; build "
          f"`{s['build']['build']}`; commit {s['commit']}; {s['date']}.")
    print(f"Measured bandwidth (the limit): {data['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; cold working set "
          f"{data['cold_working_set_bytes'] / 2**20:.0f} MiB of argument sets rotated per timing; timing: {data['timing']}.\n")
    print("| case | dtype | in->out | rank | ours us (cold) | hot us | floor us | % of bandwidth | x loop | x gather | x dense | x ref |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratios = " | ".join(f"{r[f'speedup_vs_{b}']:.2f}" if f"speedup_vs_{b}" in r else "-"
                            for b in ("loop", "gather", "dense", "ref"))
        extra = f" (mixed/rank-by-rank {r['mixed_over_rank_by_rank']:.2f})" if "mixed_over_rank_by_rank" in r else ""
        print(f"| {r['name']}{extra} | {r['dtype']} | {r['d_in']}->{r['d_out']} | {'/'.join(map(str, r['ranks']))} | "
              f"{r['lora_ext_cold_s'] * 1e6:.1f} | {r['lora_ext_hot_s'] * 1e6:.1f} | {r['floor_s'] * 1e6:.1f} | "
              f"{100 * r['share_of_bandwidth']:.0f} | {ratios} |")
    print("\nTargets (CPU kernel issue), this run:\n")
    for dtype in ("bfloat16", "float32"):
        r = find(rows, "decode T=64 distinct", dtype, ranks=[16])
        if r:
            print(f"- decode T=64, 64 distinct, 4096->4096, r16, {dtype}: {100 * r['share_of_bandwidth']:.0f}% of "
                  f"bandwidth (target 80%); {r['speedup_vs_gather']:.1f}x gather+einsum (target 10x); "
                  f"{r['speedup_vs_loop']:.1f}x loop (target 5x)")
    for rank in (16, 64):
        r = next((r for r in rows if r["name"].startswith("prefill") and r["dtype"] == "bfloat16"
                  and r["d_out"] == 4096 and r["ranks"] == [rank]), None)
        if r:
            print(f"- prefill T=4096 in 8 runs, r{rank}, bfloat16: {100 * r['speedup_vs_dense']:.0f}% of the FLOP rate "
                  f"of one dense torch.mm doing the same work (target 70%)")
    for dtype in ("bfloat16", "float32"):
        r = next((r for r in rows if "mixed ranks" in r["name"] and r["dtype"] == dtype), None)
        if r:
            print(f"- mixed ranks {{8,16,32,64}}, {dtype}: {r['mixed_over_rank_by_rank']:.2f}x the time of the same rows "
                  f"run rank by rank (target within 1.15x)")
    for dtype in ("bfloat16", "float32"):
        r = find(rows, "decode T=1 distinct", dtype, ranks=[16])
        if r:
            print(f"- T=1, 4096->4096, r16, {dtype}: {r['lora_ext_cold_s'] * 1e6:.1f} us cold, "
                  f"{r['lora_ext_hot_s'] * 1e6:.1f} us hot (target under 30 us)")


if __name__ == "__main__":
    main(sys.argv[1])
