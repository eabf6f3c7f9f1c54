"""linear_lora on CPU: lora_ext's fused base GEMM + deltas against ATen's linear + add_lora_.

    python benchmarks/bench_fused_linear.py --out benchmarks/results/fused_linear_cpu_ci_machine.json

Two parts, both float32, timed with the weights rotated over more than the last-level cache:
  gemm   the base GEMM alone for skinny batches (rows 1..64) of common layer shapes: ATen's
         torch.nn.functional.linear against linear_lora with no adapter rows (lora_ext's GEMM).
         This is what decides where the fused path is used (csrc/cpu/lora_cpu.cpp).
  model  one decode step's 28 layers of the built-in bench model (batch 32, 32 distinct rank-16
         adapters in slots of --max-rank rows, as patch_model stores them): ATen linear alone,
         lora_ext GEMM alone, ATen linear + add_lora_, linear_lora.
         The LoRA work of each path is its time minus its own GEMM's; the floor is the adapter
         bytes over the measured bandwidth.
"""

import argparse

import torch
import torch.nn.functional as F

import lora_ext
from lora_ext import atomic
from lora_ext.bench.measure import machine_info, measure_bandwidth, median_interleaved

GEMM_SHAPES = [(768, 768), (768, 2048), (2048, 768), (4096, 4096), (4096, 11008), (11008, 4096)]
GEMM_ROWS = [1, 4, 16, 32, 64]
MODEL_LAYERS = [(768, 768), (768, 256), (768, 256), (768, 768), (768, 2048), (768, 2048), (2048, 768)] * 4
COLD_BYTES = 640 << 20


def no_adapter_args(rows, d_in, d_out):
    """linear_lora arguments with every row without adapter: only the base GEMM runs."""
    return (torch.zeros(1, 1, d_in), torch.zeros(1, d_out, 1), torch.full((rows,), -1, dtype=torch.long))


def gemm_part(rounds):
    results = []
    for d_in, d_out in GEMM_SHAPES:
        copies = max(2, COLD_BYTES // (d_in * d_out * 4))
        weights = [torch.randn(d_out, d_in) for _ in range(copies)]
        for rows in GEMM_ROWS:
            x = torch.randn(rows, d_in)
            a, b, ids = no_adapter_args(rows, d_in, d_out)
            state = {"i": 0}

            def aten():
                state["i"] += 1
                F.linear(x, weights[state["i"] % copies])

            def ours():
                state["i"] += 1
                lora_ext.linear_lora(x, weights[state["i"] % copies], None, a, b, ids)

            t = median_interleaved({"aten": aten, "lora_ext": ours}, rounds)
            results.append(dict(d_in=d_in, d_out=d_out, rows=rows, aten_us=t["aten"] * 1e6,
                                lora_ext_us=t["lora_ext"] * 1e6, ratio=t["lora_ext"] / t["aten"],
                                lora_ext_gflops=2 * rows * d_in * d_out / t["lora_ext"] / 1e9))
            print(f"gemm {d_in}->{d_out} rows={rows}: ATen {t['aten'] * 1e6:.0f} us, lora_ext "
                  f"{t['lora_ext'] * 1e6:.0f} us ({t['lora_ext'] / t['aten']:.2f}x)")
    return results


def model_part(rounds, bandwidth, max_rank, slots=32, rank=16, rows=32):
    layer_bytes = sum(d_in * d_out * 4 for d_in, d_out in MODEL_LAYERS)
    adapter_bytes = sum(slots * rank * (d_in + d_out) * 4 for d_in, d_out in MODEL_LAYERS)
    stored_bytes = adapter_bytes * max_rank // rank
    copies = max(2, COLD_BYTES // (layer_bytes + stored_bytes))
    ids = torch.randperm(slots)[:rows]
    scales, ranks = torch.ones(slots), torch.full((slots,), rank, dtype=torch.int32)
    plan = lora_ext.build_plan(ids, slots)
    # Slots of max_rank rows with the adapter in the first `rank`, as lora_ext's layers store them.
    sets = [[(torch.randn(rows, d_in), torch.randn(d_out, d_in), torch.randn(slots, max_rank, d_in),
              torch.randn(slots, max_rank, d_out).transpose(1, 2)) for d_in, d_out in MODEL_LAYERS]
            for _ in range(copies)]
    none = torch.full((rows,), -1, dtype=torch.long)
    none_plan = lora_ext.build_plan(none, slots)
    state = {"i": 0}

    def next_set():
        state["i"] += 1
        return sets[state["i"] % copies]

    def aten_linear():
        for x, w, a, b in next_set():
            F.linear(x, w)

    def lora_ext_gemm():
        for x, w, a, b in next_set():
            lora_ext.linear_lora(x, w, None, a, b, none, scales, ranks, none_plan)

    def aten_then_add_lora():
        for x, w, a, b in next_set():
            lora_ext.add_lora_(F.linear(x, w), x, a, b, ids, scales, ranks, plan)

    def linear_lora():
        for x, w, a, b in next_set():
            lora_ext.linear_lora(x, w, None, a, b, ids, scales, ranks, plan)

    t = median_interleaved({f.__name__: f for f in (aten_linear, lora_ext_gemm, aten_then_add_lora, linear_lora)},
                           rounds)
    ms = {k: v * 1e3 for k, v in t.items()}
    floor = adapter_bytes / bandwidth * 1e3
    result = dict(layers=len(MODEL_LAYERS), rows=rows, adapters=slots, rank=rank, max_rank=max_rank,
                  adapter_bytes=adapter_bytes,
                  floor_ms=floor, step_ms=ms,
                  lora_work_unfused_ms=ms["aten_then_add_lora"] - ms["aten_linear"],
                  lora_work_fused_ms=ms["linear_lora"] - ms["lora_ext_gemm"],
                  overhead_over_aten_linear_ms=ms["linear_lora"] - ms["aten_linear"])
    print(f"model decode step, {len(MODEL_LAYERS)} layers: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    print(f"  LoRA work: unfused {result['lora_work_unfused_ms']:.2f} ms, fused {result['lora_work_fused_ms']:.2f} ms; "
          f"floor {floor:.2f} ms; linear_lora - ATen linear = {result['overhead_over_aten_linear_ms']:.2f} ms")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-rank", type=int, default=64,
                        help="rank rows per adapter slot in the model part (patch_model's default max_rank)")
    parser.add_argument("--skip-gemm", action="store_true", help="only the model part")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bandwidth = measure_bandwidth("cpu")
    print(f"bandwidth {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} threads")
    result = dict(setup=machine_info("cpu"), bandwidth_bytes_per_s=bandwidth, model=model_part(args.rounds, bandwidth, args.max_rank),
                  gemm=None if args.skip_gemm else gemm_part(args.rounds))
    if args.out:
        atomic.write_json(args.out, result, indent=1, default=str)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
