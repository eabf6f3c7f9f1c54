"""The backward of one LoRA layer (dx, dA, dB through autograd) against the per-adapter autograd
loop (what PEFT and mLoRA do) and against the physical limit, in one run.

Cases (4096 -> 4096, rank 16, float32 and bfloat16):
  decode   64 rows, 64 distinct adapters: memory-bound; limit = the bytes the backward must move
           (A, B, dA, dB once each, x and dy once) at the memory bandwidth measured in this run
  prefill  4096 rows in 8 adapters: compute-bound; limit = the FLOP rate of dense torch.mm calls
           doing the same FLOPs (the five GEMMs of the backward with all rows on one adapter)
Argument sets rotate so the decode working set exceeds the last-level cache, as successive layers
of a model would. Each figure is the median of repeated autograd.grad calls on retained graphs.

    python benchmarks/bench_backward.py [--quick] [--out results.json]
"""

import argparse
import ctypes
import math
import sys

import torch

import lora_ext
from lora_ext import atomic
from lora_ext.bench.measure import machine_info, measure_bandwidth, median_seconds

D_IN = D_OUT = 4096
RANK = 16
CASES = [("decode", 64, 64), ("prefill", 4096, 8)]  # (name, rows, adapters)


def keep_freed_memory():
    """Asks glibc to keep freed memory instead of returning it to the system. Every backward call
    allocates fresh gradients (33 MB for the float32 decode case) and frees the last call's; with
    glibc's default trim threshold that memory goes back to the system at each free and comes back
    as page faults (about 14 ms per call here, four times the kernels' time). A training process
    that keeps its gradients, or links a caching malloc (jemalloc, tcmalloc), does not pay that;
    the benchmark measures the kernels, for lora_ext and the loop alike."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 1 << 30))


def make_set(rows, adapters, dtype, g, device):
    """One layer's arguments. Decode (one row per adapter): rows in adapter order. Prefill: each
    adapter's rows one run, as a prompt's tokens are."""
    def cast(t):
        return t.to(device=device, dtype=dtype)
    x = cast(torch.randn(rows, D_IN, generator=g)).requires_grad_()
    a = cast(torch.randn(adapters, RANK, D_IN, generator=g) / D_IN ** 0.5).requires_grad_()
    b_rank_major = cast(torch.randn(adapters, RANK, D_OUT, generator=g) / RANK ** 0.5).requires_grad_()
    ids = (torch.arange(rows) * adapters // rows).to(device)
    scales = torch.full((adapters,), 2.0, device=device)
    dy = cast(torch.randn(rows, D_OUT, generator=g))
    return dict(x=x, a=a, b=b_rank_major, ids=ids, scales=scales, dy=dy)


def lora_ext_graph(s):
    """lora_ext's forward (kept for repeated backward): one grouped call."""
    plan = lora_ext.build_plan(s["ids"], s["a"].shape[0])
    out = lora_ext.lora_delta(s["x"], s["a"], s["b"].transpose(1, 2), s["ids"], s["scales"], None, plan)
    return out, (s["x"], s["a"], s["b"])


def per_adapter_graph(s):
    """The per-adapter autograd loop: each adapter's rows through its own A and B (separate leaves,
    as PEFT keeps one module per adapter), scattered back into the batch."""
    adapters = s["a"].shape[0]
    a_leaves = [s["a"][i].detach().clone().requires_grad_() for i in range(adapters)]
    b_leaves = [s["b"][i].detach().clone().requires_grad_() for i in range(adapters)]
    out = torch.zeros(s["x"].shape[0], D_OUT, dtype=s["x"].dtype, device=s["x"].device)
    for i in range(adapters):
        rows = (s["ids"] == i).nonzero().squeeze(1)
        part = (s["x"][rows] @ a_leaves[i].T) @ b_leaves[i] * float(s["scales"][i])
        out = out.index_copy(0, rows, part)
    return out, (s["x"], *a_leaves, *b_leaves)


def time_backward(build, sets, device):
    graphs = [build(s) for s in sets]
    turn = iter(range(10**9))

    def step():
        i = next(turn) % len(graphs)
        out, leaves = graphs[i]
        torch.autograd.grad(out, leaves, sets[i]["dy"], retain_graph=True)
    return median_seconds(step, min_time=1.0, min_runs=7, device=device)


def time_forward(sets, device):
    """lora_ext's forward on the same sets, for the same run's effective streaming rate."""
    with torch.no_grad():
        plans = [lora_ext.build_plan(s["ids"], s["a"].shape[0]) for s in sets]
        turn = iter(range(10**9))

        def step():
            i = next(turn) % len(sets)
            s = sets[i]
            lora_ext.lora_delta(s["x"], s["a"], s["b"].transpose(1, 2), s["ids"], s["scales"], None, plans[i])
        return median_seconds(step, min_time=1.0, min_runs=7, device=device)


def dense_mm_seconds(rows, dtype, g, device):
    """The five GEMMs of the backward (v, dx, u, dA, dB) with every row on one adapter."""
    x = torch.randn(rows, D_IN, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(rows, D_OUT, generator=g).to(device=device, dtype=dtype)
    a = torch.randn(RANK, D_IN, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(D_OUT, RANK, generator=g).to(device=device, dtype=dtype)

    def step():
        v = dy @ b
        v @ a
        u = x @ a.T
        v.T @ x
        dy.T @ u
    return median_seconds(step, min_time=1.0, min_runs=7, device=device)


def run_case(name, rows, adapters, dtype, bandwidth, cold_bytes, quick, device):
    g = torch.Generator().manual_seed(0)
    elem = torch.tensor([], dtype=dtype).element_size()
    weight_bytes = adapters * RANK * (D_IN + D_OUT) * elem
    must_move = 2 * weight_bytes + rows * (D_IN + D_OUT) * elem  # A, B read; dA, dB written; x, dy read
    flops = 2 * rows * RANK * (3 * D_IN + 2 * D_OUT)
    per_set = weight_bytes + rows * (D_IN + D_OUT) * elem
    count = 2 if quick else max(2, min(32, math.ceil(cold_bytes / per_set)))
    sets = [make_set(rows, adapters, dtype, g, device) for _ in range(count)]
    ours = time_backward(lora_ext_graph, sets, device)
    forward = time_forward(sets, device)
    loop = time_backward(per_adapter_graph, sets[:2], device)
    row = dict(case=name, dtype=str(dtype).replace("torch.", ""), rows=rows, adapters=adapters, d_in=D_IN,
               d_out=D_OUT, rank=RANK, argument_sets=count, lora_ext_s=ours, per_adapter_loop_s=loop,
               speedup_vs_loop=loop / ours, bytes_moved=must_move, flops=flops,
               floor_s=must_move / bandwidth, share_of_bandwidth=must_move / bandwidth / ours,
               backward_gbps=must_move / ours / 1e9, forward_s=forward,
               forward_gbps=(weight_bytes + rows * (D_IN + D_OUT) * elem) / forward / 1e9)
    if name == "prefill":
        dense = dense_mm_seconds(rows, dtype, g, device)
        row.update(dense_mm_s=dense, share_of_dense_flop_rate=dense / ours, gflops=flops / ours / 1e9)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two argument sets, float32 only")
    parser.add_argument("--out", help="write the rows and the setup as JSON here")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    kept = keep_freed_memory() if args.device == "cpu" else False
    bandwidth = measure_bandwidth(args.device)
    cold_bytes = (640 if args.device == "cpu" else 256) * 2**20
    print(f"backward of one {D_IN} -> {D_OUT} rank-{RANK} layer on {args.device}; {torch.get_num_threads()} threads; "
          f"memory bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    rows = []
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        for name, n_rows, adapters in CASES:
            r = run_case(name, n_rows, adapters, dtype, bandwidth, cold_bytes, args.quick, args.device)
            rows.append(r)
            line = (f"{name:8s} {r['dtype']:9s} T={n_rows:5d} N={adapters:3d}: lora_ext {r['lora_ext_s'] * 1e3:8.2f} ms, "
                    f"per-adapter loop {r['per_adapter_loop_s'] * 1e3:8.2f} ms ({r['speedup_vs_loop']:.1f}x)")
            if name == "decode":
                line += (f", {100 * r['share_of_bandwidth']:.0f}% of bandwidth (floor {r['floor_s'] * 1e3:.2f} ms; "
                         f"{r['backward_gbps']:.1f} GB/s moved, the forward streams {r['forward_gbps']:.1f} GB/s)")
            else:
                line += (f", {r['gflops']:.0f} GFLOP/s = {100 * r['share_of_dense_flop_rate']:.0f}% of dense mm "
                         f"({r['dense_mm_s'] * 1e3:.2f} ms)")
            print(line, flush=True)
    if args.out:
        result = dict(setup=machine_info(args.device), bandwidth_bytes_per_s=bandwidth, glibc_keeps_freed_memory=kept,
                      rows=rows)
        atomic.write_json(args.out, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
