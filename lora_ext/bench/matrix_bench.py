"""lora-ext bench --matrix: the LoRA overhead of one forward pass for every adapter mix and dtype,
against its physical floor, in one run.

Cells (each on the bench's model, all its linear layers patched, rank-16 adapters):
    decode   one token per row (a decode step's shapes; no KV cache), n adapters in use:
               identical (n = 1) / uniform / distinct (n = rows): max(32, n) rows round-robin over n
               zipf: max(32, 2n) rows, every adapter one, the rest by weights 1 / k
               with base rows: the uniform rows plus a quarter as many rows without an adapter
    prefill  n prompts of --prompt-len tokens, one adapter each (only the last token's logits)
    --compile: the decode cells of 32 rows again through torch.compile (float32, bfloat16), all on
               one compiled graph: what compiles again after the first mix is reported (0 expected)
Rows are shuffled (real batches are not sorted by adapter).

Method: for each cell the unpatched model and the patched one run the same input in pairs
(alternating which runs first); the overhead is the median of the pairs' differences.

Floor of a cell: the larger of (the adapter bytes it must read / the measured memory bandwidth)
and (its LoRA FLOPs / the compute rate of its dtype: the faster of the measured dense GEMM rates in
that dtype and in float32, since 16-bit values can always be widened and multiplied at the float32
rate; where ATen's float16 GEMM runs at a few GFLOP/s, its own rate would make a floor no kernel
needs to approach). Targets (issue 16):
    decode   overhead <= 1.5 x floor + 2 us per patched layer
    prefill  overhead <= 0.2 x the base model's forward + LoRA FLOPs / GEMM rate
"""

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from lora_ext import atomic

DECODE_ROWS = 32
RANK = 16
US_PER_LAYER = 2e-6  # the per-layer allowance of the decode target
DECODE_FLOOR_FACTOR = 1.5
PREFILL_BASE_SHARE = 0.2


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lora-ext bench --matrix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrix", action="store_true")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"],
                   choices=["float32", "bfloat16", "float16"])
    p.add_argument("--counts", type=int, nargs="*", default=[1, 2, 8, 32, 64], help="adapters in use (decode)")
    p.add_argument("--prefill-counts", type=int, nargs="*", default=[1, 2, 8, 32],
                   help="prompts, one adapter each (prefill); none: no prefill cells")
    p.add_argument("--prefill-dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--pairs", type=int, default=40, help="timed (base, LoRA) pairs per decode cell")
    p.add_argument("--prefill-pairs", type=int, default=5, help="timed pairs per prefill cell")
    p.add_argument("--compile", action="store_true", help="also the decode cells of 32 rows through torch.compile "
                   "(float32, bfloat16), counting what compiles again as the mix changes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="few pairs, short prompts, counts 1 8 32")
    p.add_argument("--out", default="lora_ext_bench", help="folder for matrix.json and matrix.txt")
    args = p.parse_args(argv)
    if args.quick:
        args.counts = [c for c in args.counts if c in (1, 8, 32)] or [1]
        args.prefill_counts = [c for c in args.prefill_counts if c in (1, 8)]
        args.prompt_len, args.pairs, args.prefill_pairs = min(args.prompt_len, 64), 5, 1
    return args


# ---- the cells ------------------------------------------------------------------------------------

@dataclass
class Cell:
    phase: str         # "decode" or "prefill"
    dtype: str
    mix: str           # identical, uniform, distinct, zipf, with base rows, one prompt each
    adapters: int      # distinct adapters in use
    row_adapters: list  # adapter index of each row, None = base model
    tokens: int        # tokens per row
    compiled: bool = False

    @property
    def label(self):
        return f"{self.phase} {self.dtype}{' compiled' if self.compiled else ''} {self.adapters} {self.mix}"


def _shuffled(rows, seed):
    random.Random(seed).shuffle(rows)
    return rows


def decode_mixes(n):
    """[(mix, row adapter indices)] for n adapters in use."""
    rows = max(DECODE_ROWS, n)
    spread = "identical" if n == 1 else "distinct" if n == rows else "uniform"
    mixes = [(spread, _shuffled([i % n for i in range(rows)], n))]
    if n > 1:
        total = max(DECODE_ROWS, 2 * n)
        weights = [1.0 / (k + 1) for k in range(n)]
        extra = total - n
        counts = [1 + int(extra * w / sum(weights)) for w in weights]
        counts[0] += total - sum(counts)  # what rounding left goes to the most popular adapter
        mixes.append(("zipf", _shuffled([k for k, c in enumerate(counts) for _ in range(c)], n + 1)))
    base_rows = rows // 4
    mixes.append(("with base rows", _shuffled([i % n for i in range(rows)] + [None] * base_rows, n + 2)))
    return mixes


def build_cells(args):
    cells = []
    for dtype in args.dtypes:
        for n in args.counts:
            cells += [Cell("decode", dtype, mix, n, rows, 1) for mix, rows in decode_mixes(n)]
    for dtype in args.prefill_dtypes:
        for n in args.prefill_counts:
            cells.append(Cell("prefill", dtype, "one prompt each", n, list(range(n)), args.prompt_len))
    if args.compile:  # the mixes of DECODE_ROWS rows: one batch shape, so one graph serves them all
        for dtype in [d for d in ("float32", "bfloat16") if d in args.dtypes]:
            for n in args.counts:
                cells += [Cell("decode", dtype, mix, n, rows, 1, compiled=True) for mix, rows in decode_mixes(n)
                          if len(rows) == DECODE_ROWS]
    return cells


# ---- floors ---------------------------------------------------------------------------------------

def layer_shapes(mm):
    """(d_in, d_out) of every patched layer."""
    return [(layer.in_features, layer.out_features) for layer in mm.layers.values()]


def cell_work(cell, shapes):
    """(adapter bytes read, LoRA FLOPs) of one forward pass of the cell."""
    elem = torch.empty((), dtype=getattr(torch, cell.dtype)).element_size()
    per_adapter = sum(RANK * (d_in + d_out) for d_in, d_out in shapes)
    adapter_rows = sum(1 for a in cell.row_adapters if a is not None)
    return cell.adapters * per_adapter * elem, 2.0 * adapter_rows * cell.tokens * per_adapter


def gemm_rate(dtype, device, size=1536):
    """FLOPs per second of a dense square GEMM in `dtype` (median of a few)."""
    from lora_ext.bench.measure import median_seconds

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return 2 * size ** 3 / median_seconds(lambda: torch.mm(a, b), min_time=0.5, device=device)


def compute_rate(rates, dtype):
    """The FLOP rate a cell's floor assumes (see the module docstring)."""
    return max(rates[dtype], rates["float32"])


# ---- timing ---------------------------------------------------------------------------------------

def cell_inputs(cell, vocab, device, names):
    g = torch.Generator().manual_seed(len(cell.row_adapters) * 7 + cell.tokens)
    ids = torch.randint(3, vocab, (len(cell.row_adapters), cell.tokens), generator=g).to(device)
    row_names = [None if a is None else names[a] for a in cell.row_adapters]
    kwargs = dict(input_ids=ids, use_cache=False)
    if cell.phase == "prefill":
        kwargs["logits_to_keep"] = 1
    return kwargs, row_names


def time_pairs(base_call, lora_call, pairs, device):
    """([base seconds], [LoRA seconds]) of `pairs` pairs after one warm-up pair; which of the two
    runs first alternates from pair to pair."""
    from lora_ext.bench.measure import seconds

    base_call(), lora_call()  # warm-up
    base, lora = [], []
    for i in range(pairs):
        first, second = (base_call, lora_call) if i % 2 == 0 else (lora_call, base_call)
        t_first = seconds(first, device=device)[1]
        t_second = seconds(second, device=device)[1]
        base.append(t_first if i % 2 == 0 else t_second)
        lora.append(t_second if i % 2 == 0 else t_first)
    return base, lora


def measure_cell(cell, models, args, floors):
    base_model, mm, names, compiled = models[cell.dtype]
    kwargs, row_names = cell_inputs(cell, base_model.config.vocab_size, args.device, names)
    serve = compiled if cell.compiled else mm
    base = compiled.base if cell.compiled else base_model
    pairs = args.prefill_pairs if cell.phase == "prefill" else args.pairs
    with torch.no_grad():
        base_samples, lora_samples = time_pairs(lambda: base(**kwargs),
                                                lambda: serve(adapter_names=row_names, **kwargs), pairs, args.device)
    diffs = [lora - base for base, lora in zip(base_samples, lora_samples)]
    base_s, lora_s, overhead = (statistics.median(t) for t in (base_samples, lora_samples, diffs))
    bandwidth, rates, layers = floors["bandwidth"], floors["gemm_rate"], floors["layers"]
    adapter_bytes, flops = cell_work(cell, floors["shapes"])
    bytes_s, flops_s = adapter_bytes / bandwidth, flops / compute_rate(rates, cell.dtype)
    floor = max(bytes_s, flops_s)
    if cell.phase == "decode":
        target = DECODE_FLOOR_FACTOR * floor + US_PER_LAYER * layers
    else:
        target = PREFILL_BASE_SHARE * base_s + flops_s
    q1, _, q3 = statistics.quantiles(diffs, n=4) if len(diffs) >= 2 else (overhead, None, overhead)
    return dict(base_samples_ms=[t * 1e3 for t in base_samples], lora_samples_ms=[t * 1e3 for t in lora_samples],
                row_adapters=cell.row_adapters,cell=cell.label, phase=cell.phase, dtype=cell.dtype, compiled=cell.compiled, mix=cell.mix,
                adapters=cell.adapters, rows=len(cell.row_adapters), tokens_per_row=cell.tokens,
                base_ms=base_s * 1e3, lora_ms=lora_s * 1e3, overhead_ms=overhead * 1e3,
                overhead_iqr_ms=[q1 * 1e3, q3 * 1e3], adapter_bytes=adapter_bytes, lora_flops=flops,
                bytes_floor_ms=bytes_s * 1e3, flops_floor_ms=flops_s * 1e3, floor_ms=floor * 1e3,
                over_floor=overhead / floor if floor > 0 else None, target_ms=target * 1e3,
                meets_target=overhead <= target)


class CompiledServing:
    """The patched model compiled once (torch.compile), and the unpatched one compiled the same way
    as its baseline."""

    def __init__(self, base_model, mm):
        self.base = torch.compile(base_model, dynamic=False)
        self.mm = mm
        mm.compile(dynamic=False)

    def __call__(self, **kwargs):
        return self.mm(**kwargs)


def build_models(args, dtype, paths):
    from lora_ext.bench.synthetic import build_default_model

    import lora_ext

    base_model = build_default_model(getattr(torch, dtype), args.device)
    patched = build_default_model(getattr(torch, dtype), args.device)
    mm = lora_ext.patch_model(patched, max_adapters=len(paths), max_rank=RANK)
    for name, path in paths.items():
        mm.load_adapter(name, path)
    return base_model, mm


# ---- report ---------------------------------------------------------------------------------------

COLUMNS = [("cell", "{}", "cell"), ("rows", "{}", "rows"), ("base ms", "{:.2f}", "base_ms"),
           ("overhead ms", "{:.3f}", "overhead_ms"), ("floor ms", "{:.3f}", "floor_ms"),
           ("bytes/flops floor", "{}", "floor_kind"), ("over/floor", "{:.2f}", "over_floor"),
           ("target ms", "{:.3f}", "target_ms"), ("meets", "{}", "meets")]


def format_rows(rows):
    def value(row, key, fmt):
        if key == "floor_kind":
            return "bytes" if row["bytes_floor_ms"] >= row["flops_floor_ms"] else "flops"
        if key == "meets":
            return "yes" if row["meets_target"] else "NO"
        return "-" if row.get(key) is None else fmt.format(row[key])

    table = [[title for title, _, _ in COLUMNS]] + [[value(r, key, fmt) for _, fmt, key in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join(" ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in table)


def summary_lines(rows, floors, recompiles):
    misses = [r for r in rows if not r["meets_target"]]
    lines = [f"memory bandwidth {floors['bandwidth'] / 1e9:.1f} GB/s; dense GEMM "
             + ", ".join(f"{d} {r / 1e9:.0f} GFLOP/s" for d, r in floors["gemm_rate"].items())
             + f"; {floors['layers']} patched layers",
             f"cells meeting the target: {len(rows) - len(misses)} of {len(rows)}"]
    headline = [r for r in rows if r["phase"] == "decode" and r["dtype"] == "float32" and not r["compiled"]
                and r["adapters"] == 32 and r["mix"] == "distinct"]
    if headline:
        lines.append(f"headline (float32, 32 distinct adapters, decode): {headline[0]['over_floor']:.2f}x the floor "
                     "(target 1.2x)")
    for dtype, count in recompiles.items():
        lines.append(f"torch.compile, {dtype}: {count} frames compiled again after the first adapter mix (0 expected: "
                     "new mixes reuse the graph)")
    return lines


# ---- run ------------------------------------------------------------------------------------------

def run(args):
    from lora_ext.bench.measure import keep_freed_memory, machine_info, measure_bandwidth
    from lora_ext.bench.synthetic import build_default_model, make_adapters

    os.makedirs(args.out, exist_ok=True)
    allocator = keep_freed_memory()  # before any model exists: prefill rounds without page-fault noise
    cells = build_cells(args)
    needed = max(c.adapters for c in cells)
    rows, recompiles = [], {}
    with tempfile.TemporaryDirectory(prefix="lora_ext_matrix_") as workdir:
        template = build_default_model(torch.float32, "cpu")
        names = [f"lora{i}" for i in range(needed)]
        paths = dict(zip(names, make_adapters(template, workdir, needed, [RANK], prefix="lora").values()))
        del template
        bandwidth = measure_bandwidth(args.device)
        dtypes = list(dict.fromkeys(c.dtype for c in cells))
        floors = dict(bandwidth=bandwidth, gemm_rate={d: gemm_rate(getattr(torch, d), args.device)
                                                            for d in dict.fromkeys(dtypes + ["float32"])})
        print(f"lora-ext bench --matrix: {len(cells)} cells, {torch.get_num_threads()} threads, "
              f"bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
        for dtype in dtypes:
            base_model, mm = build_models(args, dtype, paths)
            floors.update(shapes=layer_shapes(mm), layers=len(mm.layers))
            models = {dtype: (base_model, mm, names, None)}
            for cell in [c for c in cells if c.dtype == dtype and not c.compiled]:
                rows.append(measure_cell(cell, models, args, floors))
                print(format_rows(rows[-1:]).splitlines()[1], flush=True)
            compiled_cells = [c for c in cells if c.dtype == dtype and c.compiled]
            if compiled_cells:
                rows += measure_compiled(compiled_cells, base_model, mm, names, args, floors, recompiles)
            del base_model, mm, models
    floors.pop("shapes")
    text = "\n".join([format_rows(rows), "", *summary_lines(rows, floors, recompiles)])
    print()
    print(text)
    setup = dict(machine_info(args.device), allocator=allocator or "default")
    result = dict(setup=setup, args=vars(args), floors=floors, rows=rows, recompiles=recompiles)
    atomic.write_json(os.path.join(args.out, "matrix.json"), result, indent=1, default=str)
    with atomic.atomic_path(os.path.join(args.out, "matrix.txt")) as tmp:
        with open(tmp, "w") as f:
            f.write(text + "\n")
    print(f"\nwrote {args.out}/matrix.json, matrix.txt")
    return 0


def measure_compiled(cells, base_model, mm, names, args, floors, recompiles):
    """The compiled cells of one dtype, on the base model and the patched one, each compiled once
    (torch.compile, static shapes). Every cell after the first brings a new adapter mix (other
    adapters, other rows): the patched model must serve it without compiling anything again."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    serving = CompiledServing(base_model, mm)
    models = {cells[0].dtype: (base_model, mm, names, serving)}
    rows = []
    frames_after_first = None
    for cell in cells:
        rows.append(measure_cell(cell, models, args, floors))
        print(format_rows(rows[-1:]).splitlines()[1], flush=True)
        if frames_after_first is None:
            frames_after_first = counters["frames"]["ok"]
    recompiles[cells[0].dtype] = counters["frames"]["ok"] - frames_after_first
    return rows


def main(argv=None):
    args = parse_args(list(argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    code = run(args)
    print(f"total time {time.perf_counter() - started:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
