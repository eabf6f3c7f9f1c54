"""What the benchmark serves: the model, the prompts and the adapters (the user's, or synthetic
ones saved as real PEFT directories), and the models built from them."""

import warnings
from dataclasses import dataclass

import torch

import lora_ext
from lora_ext.adapters.config import read_config
from lora_ext.bench.synthetic import build_default_model, load_local_model, make_adapters


@dataclass
class Workload:
    args: object       # the parsed command line
    ids: torch.Tensor  # (batch, prompt_len) prompt tokens
    mask: torch.Tensor
    paths: dict        # {adapter name: PEFT directory}
    main_names: list   # the adapters of the N-adapter batches
    mixed_names: list  # N adapters of mixed ranks ([] with --adapters)

    def model(self, dtype):
        """A fresh copy of the model (same weights every time)."""
        return build_model(self.args, dtype)

    def max_rank(self):
        """The largest rank any adapter's config gives a module (r or rank_pattern); loading then
        checks that the weights agree, so the weights need not be read here."""
        return max(read_config(name, path).largest_rank for name, path in self.paths.items())

    def patched(self, model, names):
        """`model` patched by lora_ext with the adapters `names` loaded."""
        mm = lora_ext.patch_model(model, max_adapters=self.args.num_adapters, max_rank=self.max_rank())
        for name in names:
            mm.load_adapter(name, self.paths[name])
        return mm


def build_model(args, dtype):
    """The model of --model, or the built-in one, on --device in `dtype`."""
    if args.model:
        return load_local_model(args.model, dtype, args.device)
    return build_default_model(dtype, args.device)


def make_workload(args, model, workdir, mixed_ranks):
    """Prompts for `model` and the adapters: args.adapters, else args.num_adapters synthetic
    adapters of args.ranks and as many of `mixed_ranks`, written under `workdir`."""
    g = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (args.batch_size, args.prompt_len), generator=g)
    ids, mask = ids.to(args.device), torch.ones_like(ids).to(args.device)
    if args.adapters:
        paths = {f"user{i}": d for i, d in enumerate(args.adapters)}
        return Workload(args, ids, mask, paths, list(paths), [])
    paths = make_adapters(model, workdir, args.num_adapters, args.ranks, prefix="lora")
    mixed = make_adapters(model, workdir, args.num_adapters, mixed_ranks, prefix="mixed")
    return Workload(args, ids, mask, {**paths, **mixed}, list(paths), list(mixed))


def row_names(names, batch_size):
    """The adapter of each batch row: `names` repeated over the rows."""
    return [names[i % len(names)] for i in range(batch_size)]


def peft_model(model, paths):
    """`model` wrapped by PEFT with the adapters {name: directory} loaded."""
    from peft import PeftModel

    names = list(paths)
    with warnings.catch_warnings():
        # PEFT reads a transformers property that transformers 5 deprecates; nothing a user can change.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft = PeftModel.from_pretrained(model, paths[names[0]], adapter_name=names[0])
        for name in names[1:]:
            peft.load_adapter(paths[name], adapter_name=name)
    return peft.eval()
