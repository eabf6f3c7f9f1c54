"""lora-ext bench --kinds: decode with DoRA adapters and with adapters that carry their own lm_head
(modules_to_save), against plain LoRA at the same rank and adapter count, and against PEFT serving
the same adapters one after another (PEFT cannot mix DoRA rows in one batch).

Scenarios, on the bench's model and prompts, in interleaved rounds: the base model; lora_ext
serving a batch that mixes N plain rank-r adapters on every linear layer; the same with N DoRA
adapters; the same with N plain adapters that each carry an lm_head copy; PEFT serving the DoRA
adapters and the lm_head adapters adapter by adapter (one pass per adapter). Reports each one's
median decode step and its overhead over the base model (median of per-round differences), and
the ratio DoRA / plain LoRA (target: at most 1.2).
"""

import argparse
import os
import statistics
import sys
import tempfile

import torch

from lora_ext import atomic

SCENARIOS = ("base", "plain LoRA", "DoRA", "lm_head copies", "PEFT DoRA, adapter by adapter",
             "PEFT lm_head copies, adapter by adapter")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lora-ext bench --kinds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", action="store_true")
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="2 adapters, short prompts, 4 steps, one round, batch 8")
    p.add_argument("--out", default="lora_ext_bench", help="folder for kinds_bench.json and kinds_bench.txt")
    args = p.parse_args(argv)
    if args.quick:
        args.num_adapters, args.prompt_len, args.new_tokens, args.repeats, args.batch_size = 2, 16, 4, 1, 8
    return args


def write_adapters(model, root, args):
    """{kind: {name: directory}}: N synthetic rank-r adapters on every linear layer, plain, DoRA
    (magnitudes 0.5-1.5x the norms PEFT would start from) and with an lm_head copy."""
    from lora_ext.bench.synthetic import linear_modules, write_peft_adapter

    modules = linear_modules(model)
    layers = dict(model.named_modules())
    head = model.get_output_embeddings().weight.detach().float()

    def dora(i):
        def extend(tensors, config):
            g = torch.Generator().manual_seed(4000 + i)
            for name, _, _ in modules:
                a, b = (tensors[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
                weight = layers[name].weight.detach().float() + config["lora_alpha"] / args.rank * (b @ a)
                scale = torch.rand(weight.shape[0], generator=g) + 0.5
                tensors[f"base_model.model.{name}.lora_magnitude_vector"] = weight.norm(dim=1) * scale
            config["use_dora"] = True
        return extend

    def head_copy(i):
        def extend(tensors, config):
            g = torch.Generator().manual_seed(4000 + i)
            tensors["base_model.model.lm_head.weight"] = head + 0.01 * torch.randn(head.shape, generator=g)
            config["modules_to_save"] = ["lm_head"]
        return extend

    kinds = {"plain": lambda i: None, "DoRA": dora, "lm_head copies": head_copy}
    out = {kind: {} for kind in kinds}
    for i in range(args.num_adapters):
        for kind, extension in kinds.items():
            name = f"{kind.split()[0]}{i}"
            out[kind][name] = write_peft_adapter(os.path.join(root, name), modules, args.rank, None, seed=3000 + i,
                                                 extend=extension(i))
    return out


def run(args):
    from lora_ext.bench.measure import machine_info
    from lora_ext.bench.runners import BatchRunner, SplitRunner, time_interleaved
    from lora_ext.bench.scenarios import Scenario
    from lora_ext.bench.synthetic import build_default_model
    from lora_ext.bench.workload import peft_model, row_names

    import lora_ext

    dtype = getattr(torch, args.dtype)
    fresh = lambda: build_default_model(dtype, args.device)  # noqa: E731  (same weights every time)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 8192, (args.batch_size, args.prompt_len), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    with tempfile.TemporaryDirectory(prefix="lora_ext_kinds_") as root:
        paths = write_adapters(build_default_model(torch.float32, "cpu"), root, args)
        base = fresh()
        scenarios = [Scenario("base", "base", BatchRunner(base, base), [], args.new_tokens)]
        patched = {}
        for kind in ("plain LoRA", "DoRA", "lm_head copies"):
            adapters = paths["plain" if kind == "plain LoRA" else kind]
            mm = lora_ext.patch_model(fresh(), max_adapters=args.num_adapters, max_rank=args.rank,
                                      modules_to_save=["lm_head"] if kind == "lm_head copies" else None)
            for name, path in adapters.items():
                mm.load_adapter(name, path)
            rows = row_names(list(adapters), args.batch_size)
            patched[kind] = (mm, rows)
            scenarios.append(Scenario(kind, "lora_ext", BatchRunner(lambda _m=mm, _r=rows, **kw: _m(adapter_names=_r,
                                                                                                     **kw), mm.model),
                                      rows, args.new_tokens))
        for kind in ("DoRA", "lm_head copies"):
            adapters = paths[kind]
            rows = row_names(list(adapters), args.batch_size)
            peft = peft_model(fresh(), adapters)
            groups = []
            for name in adapters:
                index = torch.tensor([i for i, r in enumerate(rows) if r == name], device=args.device)
                groups.append((index, BatchRunner(lambda _p=peft, _n=name, **kw: (_p.set_adapter(_n), _p(**kw))[1],
                                                  peft)))
            scenarios.append(Scenario(f"PEFT {kind}, adapter by adapter", "split", SplitRunner(groups), rows,
                                      max(2, args.new_tokens // 4)))
        times = time_interleaved(scenarios, ids, mask, args.repeats, args.device)
        times.pop("probe")
    result = summarize(args, scenarios, times, machine_info(args.device))
    os.makedirs(args.out, exist_ok=True)
    atomic.write_json(os.path.join(args.out, "kinds_bench.json"), result, indent=1)
    atomic.write_text(os.path.join(args.out, "kinds_bench.txt"), "\n".join(result["lines"]) + "\n")
    print("\n".join(result["lines"]))
    print(f"\nwrote {args.out}/kinds_bench.json and kinds_bench.txt")
    return 0


def summarize(args, scenarios, times, setup):
    base_rounds = [statistics.median(steps) for steps in times["base"]["steps"]]
    rows = []
    for s in scenarios:
        rounds = [statistics.median(steps) for steps in times[s.name]["steps"]]
        row = dict(scenario=s.name, decode_step_ms=1e3 * statistics.median(
            x for steps in times[s.name]["steps"] for x in steps))
        if s.kind != "base":
            row["overhead_ms"] = 1e3 * statistics.median(a - b for a, b in zip(rounds, base_rounds))
        rows.append(row)
    by = {r["scenario"]: r for r in rows}
    plain_rounds, dora_rounds = ([statistics.median(steps) for steps in times[k]["steps"]] for k in ("plain LoRA", "DoRA"))
    dora_extra = 1e3 * statistics.median(d - p for d, p in zip(dora_rounds, plain_rounds))
    step_ratio = by["DoRA"]["decode_step_ms"] / by["plain LoRA"]["decode_step_ms"]
    # the overhead ratio means something only when plain LoRA's overhead is positive (on CPU the
    # fused linear_lora can beat the base GEMM); the step ratio always does
    plain_overhead = by["plain LoRA"]["overhead_ms"]
    dora_ratio = by["DoRA"]["overhead_ms"] / plain_overhead if plain_overhead > 0 else None
    lines = [f"lora-ext bench --kinds: built-in Llama, {args.device} {args.dtype}, {setup.get('gpu') or setup.get('cpu')}, "
             f"{setup['threads']} threads, commit {setup['commit']}",
             f"  batch {args.batch_size} x prompt {args.prompt_len}, {args.new_tokens} decode steps x {args.repeats} "
             f"rounds, {args.num_adapters} rank-{args.rank} adapters per batch on every linear layer", ""]
    lines += [f"{r['scenario']:<40} decode step {r['decode_step_ms']:9.2f} ms"
              + (f"   overhead {r['overhead_ms']:+8.2f} ms" if "overhead_ms" in r else "") for r in rows]
    lines += ["", f"DoRA vs plain LoRA at the same rank and count: +{dora_extra:.2f} ms per step, step ratio "
                  f"{step_ratio:.3f}, overhead ratio "
                  + (f"{dora_ratio:.2f}" if dora_ratio is not None else "n/a (plain LoRA's overhead is not positive)")
                  + " (target at most 1.2)"]
    return dict(setup=setup, args=vars(args), rows=rows, dora_extra_ms=dora_extra, dora_step_over_plain=step_ratio,
                dora_overhead_over_plain=dora_ratio, lines=lines)


def main(argv):
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
