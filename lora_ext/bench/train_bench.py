"""lora-ext bench --train: one training step (forward + backward + optimizer step) of many adapters
at once, against the ways PEFT trains, in interleaved rounds on the same model and data.

Scenarios (the bench's default model, float32): the frozen base model's forward + backward (the
floor: backpropagation through the base, no weights to train); lora_ext training N rank-r adapters
on every linear layer with one sequence each; PEFT training one adapter on all N sequences; PEFT
training the N adapters one after another (PEFT cannot mix adapters in a training batch). Reports
step time, tokens/s, the LoRA overhead over the frozen base, and each scenario's peak memory
(measured in a fresh process each, the resident set after two steps).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

SCENARIOS = ("frozen base", "lora_ext", "PEFT one adapter", "PEFT adapter by adapter")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lora-ext bench --train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true")
    p.add_argument("--num-adapters", type=int, default=8, help="adapters, one sequence each")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    p.add_argument("--quick", action="store_true", help="2 adapters, 32 tokens, 1 round, no memory")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--out", default="lora_ext_bench", help="folder for train_bench.json and train_bench.txt")
    p.add_argument("--scenario-memory", help=argparse.SUPPRESS)  # internal: one scenario's peak
    args = p.parse_args(argv)
    if args.quick:
        args.num_adapters, args.seq_len, args.repeats, args.no_memory = 2, 32, 1, True
    return args


def causal_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def workload(args):
    """(token rows, adapter names, the adapters' PEFT config) every scenario shares."""
    from lora_ext.bench.synthetic import DEFAULT_MODEL_CONFIG

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, DEFAULT_MODEL_CONFIG["vocab_size"], (args.num_adapters, args.seq_len), generator=g)
    names = [f"a{i}" for i in range(args.num_adapters)]
    config = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False)
    return ids, names, config


def adamw(params):
    """Every scenario's optimizer: AdamW with its fused kernel (one pass over all parameters; the
    default per-tensor loop on CPU took 58 ms for the 8 adapters' 448 tensors here, fused 9 ms)."""
    return torch.optim.AdamW(params, lr=1e-4, fused=True)


def fresh_model():
    from lora_ext.bench.synthetic import build_default_model

    return build_default_model(torch.float32, "cpu")


def frozen_step(ids, names, config):
    model = fresh_model().train()
    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.get_input_embeddings()

    def step():
        x = embed(ids).detach().requires_grad_()  # backpropagate through every layer, train no weight
        causal_loss(model(inputs_embeds=x).logits, ids).backward()
    return step, None


def lora_ext_step(ids, names, config):
    import lora_ext
    from lora_ext.losses import per_adapter_loss

    mm = lora_ext.patch_model(fresh_model(), max_adapters=len(names), max_rank=config["r"])
    g = torch.Generator().manual_seed(1)
    for name in names:
        mm.add_adapter(name, config, generator=g)
    opt = adamw([p for name in names for p in mm.adapter_parameters(name)])
    mm.train()

    def step():
        per_adapter_loss(mm(input_ids=ids, adapter_names=names).logits, ids, names)[0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, mm


def peft_one_step(ids, names, config):
    import peft

    model = peft.get_peft_model(fresh_model(), peft.LoraConfig(**config)).train()
    opt = adamw([p for p in model.parameters() if p.requires_grad])

    def step():
        causal_loss(model(input_ids=ids).logits, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, None


def peft_many_step(ids, names, config):
    import peft

    model = peft.get_peft_model(fresh_model(), peft.LoraConfig(**config), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, peft.LoraConfig(**config))
    model.train()
    opts = {}
    for name in names:
        model.set_adapter(name)
        opts[name] = adamw([p for p in model.parameters() if p.requires_grad])

    def step():
        for i, name in enumerate(names):
            model.set_adapter(name)
            causal_loss(model(input_ids=ids[i:i + 1]).logits, ids[i:i + 1]).backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
    return step, None


BUILDERS = dict(zip(SCENARIOS, (frozen_step, lora_ext_step, peft_one_step, peft_many_step)))


def setup(args):
    """({scenario: one step}, the patched model, adapter names)."""
    ids, names, config = workload(args)
    steps, mm = {}, None
    for name, build in BUILDERS.items():
        steps[name], patched = build(ids, names, config)
        mm = mm or patched
    return steps, mm, names


def peak_memory(args, scenario):
    """The resident-set peak (bytes) of a fresh process that builds the scenario and runs two steps."""
    cmd = [sys.executable, "-m", "lora_ext.bench.train_bench", "--scenario-memory", scenario,
           "--num-adapters", str(args.num_adapters), "--rank", str(args.rank), "--seq-len", str(args.seq_len)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"the memory process of {scenario!r} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def resident_bytes(field):
    """VmRSS or VmHWM (the peak) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def measure_one_scenario(args):
    """Prints the resident set after building the scenario, and its peak during two steps (the peak
    is reset after the build, whose own transient peak would otherwise hide the training's)."""
    step, _ = BUILDERS[args.scenario_memory](*workload(args))
    built = resident_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        reset = True
    except OSError:
        reset = False
    for _ in range(2):
        step()
    peak = resident_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(built=built, peak=peak, peak_reset=reset)))


def adapters_state_bytes(mm, names):
    """The adapters' weights, gradients and AdamW's two moments: four float32 copies."""
    return 4 * sum(p.numel() * p.element_size() for name in names for p in mm.adapter_parameters(name))


def run(args):
    from lora_ext.bench.measure import interleaved_rounds, machine_info, seconds
    from lora_ext import atomic

    os.makedirs(args.out, exist_ok=True)
    steps, mm, names = setup(args)
    rounds = interleaved_rounds({name: (lambda f=f: seconds(f)[1]) for name, f in steps.items()}, args.repeats)
    tokens = args.num_adapters * args.seq_len
    base = rounds["frozen base"]
    rows = []
    for name in SCENARIOS:
        t = rounds[name]
        row = dict(scenario=name, step_s=statistics.median(t), tokens_per_s=tokens / statistics.median(t),
                   step_s_per_round=t)
        if name != "frozen base":
            row["overhead_s"] = statistics.median(a - b for a, b in zip(t, base))
        rows.append(row)
    if not args.no_memory:
        for row in rows:
            row.update(peak_memory(args, row["scenario"]))
    by = {r["scenario"]: r for r in rows}
    ours, one = by["lora_ext"], by["PEFT one adapter"]
    summary = [f"lora_ext, {args.num_adapters} adapters in one batch: step {ours['step_s'] * 1e3:.0f} ms against PEFT's "
               f"one-adapter step {one['step_s'] * 1e3:.0f} ms ({ours['step_s'] / one['step_s']:.2f}x; target at most 1x)",
               f"LoRA overhead over the frozen base: lora_ext {ours['overhead_s'] * 1e3:.0f} ms, PEFT one adapter "
               f"{one['overhead_s'] * 1e3:.0f} ms ({ours['overhead_s'] / one['overhead_s']:.2f} of it; target at most 0.5)"]
    if not args.no_memory:
        state = adapters_state_bytes(mm, names)
        summary.append(f"peak memory: lora_ext {ours['peak'] / 2**20:.0f} MiB, PEFT one adapter {one['peak'] / 2**20:.0f} "
                       f"MiB + the {args.num_adapters} adapters' weights, gradients and optimizer state "
                       f"{state / 2**20:.0f} MiB = {(one['peak'] + state) / 2**20:.0f} MiB (target: at most that)")
    width = max(len(s) for s in SCENARIOS)
    lines = [f"{'scenario':{width}}  step ms  tokens/s  overhead ms" + ("  peak MiB" if not args.no_memory else "")]
    for r in rows:
        over = f"{r['overhead_s'] * 1e3:11.1f}" if "overhead_s" in r else f"{'-':>11}"
        peak = f"  {r['peak'] / 2**20:8.0f}" if "peak" in r else ""
        lines.append(f"{r['scenario']:{width}}  {r['step_s'] * 1e3:7.1f}  {r['tokens_per_s']:8.0f}  {over}{peak}")
    text = "\n".join(lines + [""] + summary)
    print(text)
    result = dict(setup=machine_info("cpu"), args=vars(args), rows=rows, summary=summary)
    atomic.write_json(os.path.join(args.out, "train_bench.json"), result, indent=1, default=str)
    atomic.write_text(os.path.join(args.out, "train_bench.txt"), text + "\n")
    print(f"\nwrote {args.out}/train_bench.json, train_bench.txt")
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.scenario_memory:
        measure_one_scenario(args)
        return 0
    started = time.perf_counter()
    print(f"lora-ext bench --train: {args.num_adapters} rank-{args.rank} adapters on every linear layer, one "
          f"sequence of {args.seq_len} tokens each, {args.repeats} rounds, {torch.get_num_threads()} threads")
    code = run(args)
    print(f"total time {time.perf_counter() - started:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
