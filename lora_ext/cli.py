"""The lora-ext command: `lora-ext inspect DIR`, `lora-ext bench`, `lora-ext train` (and `python -m lora_ext ...`)."""

import argparse
import sys

from lora_ext.adapters.peft_format import AdapterError, read_peft_adapter


def inspect_adapter(path, allow_pickle=False, max_rank=None, out=None):
    """Prints an adapter's modules, ranks and scalings, or its problems; returns the exit code."""
    out = out or sys.stdout
    try:
        adapter = read_peft_adapter("inspected", path, allow_pickle=allow_pickle)
    except AdapterError as exc:
        print(f"{path}: problem: {exc}", file=out)
        return 1
    config = adapter.config
    print(f"{path}: LoRA adapter, base model {config.base_model_name_or_path!r}", file=out)
    print(f"  r={config.r} lora_alpha={config.lora_alpha} use_rslora={config.use_rslora} "
          f"target_modules={_listed(config.target_modules)!r}", file=out)
    for key in ("rank_pattern", "alpha_pattern"):
        if getattr(config, key):
            print(f"  {key}={dict(getattr(config, key))!r}", file=out)
    for key in ("exclude_modules", "layers_to_transform", "layers_pattern"):
        if getattr(config, key) is not None:
            print(f"  {key}={_listed(getattr(config, key))!r}", file=out)
    if config.use_dora:
        print("  use_dora=True (DoRA: every module has a magnitude vector)", file=out)
    if config.lora_bias:
        print("  lora_bias=True (every module's lora_B has a bias)", file=out)
    if config.fan_in_fan_out:
        print("  fan_in_fan_out=True (the base weight is stored (in, out); lora_A / lora_B are read alike)", file=out)
    if config.extra:
        print(f"  keys lora_ext does not read: {', '.join(sorted(config.extra))}", file=out)
    width = max(len(m) for m in adapter.modules)
    print(f"  {'module':{width}}  rank  scaling     d_in  d_out", file=out)
    problems = 0
    for module, w in adapter.modules.items():
        print(f"  {module:{width}}  {w.rank:4d}  {w.scaling:7.4f}  {w.lora_a.shape[1]:6d} {w.lora_b.shape[0]:6d}", file=out)
        if max_rank is not None and w.rank > max_rank:
            print(f"  problem: module {module!r} has rank {w.rank} above --max-rank {max_rank}", file=out)
            problems += 1
    for module, copy in adapter.saved.items():
        print(f"  modules_to_save copy of {module}: weight {tuple(copy['weight'].shape)}"
              f"{', bias' if 'bias' in copy else ''}", file=out)
    print(f"  {len(adapter.modules)} modules, {adapter.nbytes / 2**20:.2f} MiB of weights"
          f"{f', {problems} problems' if problems else ', no problems found'}", file=out)
    return 1 if problems else 0


def _listed(value):
    return list(value) if isinstance(value, tuple) else value


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own parser takes every remaining argument
        from lora_ext.bench.main import main as bench_main  # imported here: it needs transformers

        return bench_main(argv[1:])
    if argv[:1] == ["train"]:
        from lora_ext.finetune.main import main as train_main

        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="lora-ext", description="Serve many LoRA adapters on one base model.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="show a PEFT adapter's modules, ranks, scalings and problems")
    inspect.add_argument("directory", nargs="+")
    inspect.add_argument("--allow-pickle", action="store_true",
                         help="read adapter_model.bin (with torch.load(weights_only=True))")
    inspect.add_argument("--max-rank", type=int, default=None, help="report modules above this rank as problems")
    commands.add_parser("bench", help="end-to-end multi-adapter throughput benchmark (lora-ext bench --help)")
    commands.add_parser("train", help="fine-tune one adapter per dataset in one run (lora-ext train --help)")
    args = parser.parse_args(argv)
    return max(inspect_adapter(d, args.allow_pickle, args.max_rank) for d in args.directory)


if __name__ == "__main__":
    sys.exit(main())
