"""lora-ext bench --tp N: decode on a tensor-parallel model (transformers' tp_plan="auto" over N
ranks), under torchrun:

    torchrun --nproc-per-node 2 -m lora_ext bench --tp 2

Scenarios, in interleaved rounds on the same prompts: the tensor-parallel model without adapters
(the baseline) and the same model patched by lora_ext serving a batch that mixes N adapters. Reports
each one's prefill and median decode step (rank 0's clock; every rank waits for the others at each
all-reduce), the LoRA overhead, and the collectives of one forward pass of each, counted by the
profiler at the process-group backend (gloo or NCCL): lora_ext should add none per layer, only one
small all-reduce per call that checks the ranks were given the same adapter names.
"""

import argparse
import collections
import os
import shutil
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist

from lora_ext import atomic


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lora-ext bench --tp N", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel ranks (torchrun's --nproc-per-node)")
    p.add_argument("--model", help="a local Hugging Face model directory (default: the bench's built-in Llama)")
    p.add_argument("--num-adapters", type=int, default=8, help="distinct adapters in the batch")
    p.add_argument("--rank", type=int, default=16, help="rank of the synthetic adapters")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quick", action="store_true", help="shorter prompts, fewer steps, one round")
    p.add_argument("--out", default="lora_ext_bench", help="folder for tp_bench.json and tp_bench.txt (rank 0)")
    args = p.parse_args(argv)
    if args.quick:
        args.prompt_len, args.new_tokens, args.repeats = min(args.prompt_len, 16), min(args.new_tokens, 4), 1
    return args


def start_process_group(args):
    """The default process group from torchrun's environment (gloo on CPU, NCCL on GPUs); the
    world must be the --tp ranks."""
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit(f"lora-ext bench --tp {args.tp} runs under torchrun: "
                         f"torchrun --nproc-per-node {args.tp} -m lora_ext bench --tp {args.tp}")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_world_size() != args.tp:
        raise SystemExit(f"--tp {args.tp} but torchrun started {dist.get_world_size()} processes")
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def shared_files(args, workdir):
    """(model directory, {adapter name: directory}) written by rank 0 and seen by every rank."""
    from lora_ext.bench.synthetic import build_default_model, linear_modules, write_peft_adapter

    paths = [None]
    if dist.get_rank() == 0:
        model_dir = args.model or os.path.join(workdir, "model")
        if args.model:
            from lora_ext.bench.synthetic import load_local_model
            model = load_local_model(args.model, torch.float32, "cpu")
        else:
            model = build_default_model(torch.float32, "cpu")
            model.save_pretrained(model_dir)
        modules = linear_modules(model)
        adapters = {f"tp{i}": write_peft_adapter(os.path.join(workdir, f"tp{i}"), modules, args.rank, None,
                                                 seed=2000 + i) for i in range(args.num_adapters)}
        paths = [(model_dir, adapters)]
    dist.broadcast_object_list(paths, src=0)
    return paths[0]


def load_sharded(model_dir, dtype, device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, tp_plan="auto", local_files_only=True)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = 0
    return model.to(device).eval()


def backend_collectives(call):
    """{collective: count} that one call() ran, as the profiler sees them at the process-group
    backend (events named gloo:... or nccl:...)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    return dict(collections.Counter(e.name for e in prof.events() if e.name.split(":")[0] in ("gloo", "nccl")))


def run(args):
    import lora_ext
    from lora_ext.bench.measure import machine_info
    from lora_ext.bench.runners import BatchRunner, time_interleaved
    from lora_ext.bench.scenarios import Scenario
    from lora_ext.bench.workload import row_names

    device = start_process_group(args)
    dtype = getattr(torch, args.dtype)
    workdir = tempfile.mkdtemp(prefix="lora_ext_tp_bench_") if dist.get_rank() == 0 else None
    try:
        model_dir, adapters = shared_files(args, workdir)
        base = load_sharded(model_dir, dtype, device)
        mm = lora_ext.patch_model(load_sharded(model_dir, dtype, device), max_adapters=args.num_adapters,
                                  max_rank=args.rank)
        for name, path in adapters.items():
            mm.load_adapter(name, path)
        dist.barrier()  # rank 0 removes the files only after every rank read them
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch_size, args.prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    names = row_names(list(adapters), args.batch_size)

    def lora_call(**kw):
        return mm(adapter_names=names, **kw)
    scenarios = [Scenario("tensor-parallel base", "base", BatchRunner(base, base), [], args.new_tokens),
                 Scenario(f"lora_ext, {len(adapters)} adapters", "lora_ext", BatchRunner(lora_call, mm.model), names,
                          args.new_tokens)]
    times = time_interleaved(scenarios, ids, mask, args.repeats, device.type)
    times.pop("probe")
    with torch.no_grad():
        counts = {"base": backend_collectives(lambda: base(input_ids=ids, attention_mask=mask)),
                  "lora_ext": backend_collectives(lambda: lora_call(input_ids=ids, attention_mask=mask))}
    memory = adapter_memory(mm, list(adapters))
    result = summarize(args, scenarios, times, counts, memory, len(mm.layers), machine_info(device.type), dtype)
    if dist.get_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        atomic.write_json(os.path.join(args.out, "tp_bench.json"), result, indent=1)
        atomic.write_text(os.path.join(args.out, "tp_bench.txt"), "\n".join(result["lines"]) + "\n")
        print("\n".join(result["lines"]))
        print(f"\nwrote {args.out}/tp_bench.json and tp_bench.txt")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def adapter_memory(mm, names):
    """(bytes of the adapters this rank holds, bytes the same adapters take in one process)."""
    whole = 0
    for name in names:
        for module, rank in mm.store.record(name).ranks.items():
            layer = mm.layers[module]
            whole += rank * sum(layer.full_shape) * layer.lora_a.element_size()
    return sum(mm.store.adapter_bytes(n) for n in names), whole


def summarize(args, scenarios, times, counts, memory, patched_layers, setup, dtype):
    rows = []
    for s in scenarios:
        steps = [t for round_steps in times[s.name]["steps"] for t in round_steps]
        rows.append(dict(scenario=s.name, prefill_ms=1e3 * statistics.median(times[s.name]["prefill"]),
                         decode_step_ms=1e3 * statistics.median(steps)))
    overhead = rows[1]["decode_step_ms"] - rows[0]["decode_step_ms"]
    total = {k: sum(v.values()) for k, v in counts.items()}
    added_per_layer = (total["lora_ext"] - total["base"] - 1) / patched_layers  # 1: the adapter-name check
    lines = [f"lora-ext bench --tp {args.tp}: {args.model or 'built-in Llama'}, {args.dtype}, {setup.get('gpu') or setup.get('cpu')}, "
             f"{torch.get_num_threads()} threads per rank, commit {setup['commit']}",
             f"  batch {args.batch_size} x prompt {args.prompt_len}, {args.new_tokens} decode steps x {args.repeats} "
             f"rounds, {args.num_adapters} rank-{args.rank} adapters on {patched_layers} patched layers", ""]
    lines += [f"{r['scenario']:<28} prefill {r['prefill_ms']:9.2f} ms   decode step {r['decode_step_ms']:8.2f} ms"
              for r in rows]
    lines += ["", f"LoRA decode overhead: {overhead:+.2f} ms per step "
                  f"({100 * overhead / rows[0]['decode_step_ms']:+.1f}% of the base step)",
              f"collectives in one forward pass: base {total['base']} {counts['base']}, lora_ext {total['lora_ext']} "
              f"{counts['lora_ext']}",
              f"  added per patched layer: {added_per_layer:g} (beyond the one adapter-name check per call)",
              f"adapter bytes on this rank: {memory[0] / 2**20:.2f} MiB of {memory[1] / 2**20:.2f} MiB in one process "
              f"({memory[0] / memory[1]:.3f}; (1 + 1/N)/2 = {(1 + 1 / args.tp) / 2:.3f} when A and B are alike in size)"]
    return dict(setup=setup, args=vars(args), dtype=str(dtype), rows=rows, overhead_ms=overhead,
                collectives=counts, collectives_added_per_layer=added_per_layer, adapter_bytes_this_rank=memory[0],
                adapter_bytes_one_process=memory[1], lines=lines)


def main(argv):
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
