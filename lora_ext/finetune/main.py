"""lora-ext train: fine-tune one adapter per dataset in one run, in mixed batches over a frozen base.

    lora-ext train --model DIR --data NAME=FILE.jsonl [NAME=FILE.jsonl ...] --out DIR
    lora-ext train            # the built-in demo: no download, a couple of minutes on 2 CPU cores

Each JSONL line is {"text": ...} or {"prompt": ..., "completion": ...} (then only the completion
takes loss). Every step takes --batch-size rows of every dataset into one batch; the loss is the sum
of each adapter's mean loss over its own rows, so each adapter trains exactly as it would alone.
Writes one PEFT adapter directory per dataset, loss.json, loss.txt (a table) and loss.png into --out.
The demo trains three adapters on the bench's small Llama, each to answer a symbol with its image
under its own permutation (a random model cannot), then shows that each adapter solves its task
and not the others', and that "__base__" rows are unchanged.
"""

import argparse
import os
import sys
import time

import torch

import lora_ext
from lora_ext import atomic
from lora_ext.finetune import data
from lora_ext.losses import per_adapter_loss

DEMO_ADAPTERS = ("alpha", "beta", "gamma")
DEMO_SYMBOLS = list(range(10, 26))  # 16 token ids of the bench model's vocabulary


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lora-ext train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local Hugging Face causal LM with its tokenizer (default: the demo model)")
    p.add_argument("--data", nargs="+", default=[], metavar="NAME=FILE.jsonl", help="one dataset per adapter")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: 2 x rank)")
    p.add_argument("--targets", default="all-linear", help="target_modules: all-linear or comma-separated names")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 100)")
    p.add_argument("--batch-size", type=int, default=4, help="rows of every dataset in each step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="lora_ext_train")
    args = p.parse_args(argv)
    for name in ("rank", "batch_size", "max_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.data and not args.model:
        p.error("--data needs --model (the demo runs without either)")
    args.datasets = {}
    for item in args.data:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--data takes NAME=FILE.jsonl, not {item!r}")
        args.datasets[name] = path
    args.steps = args.steps or 100  # the demo's tasks are learned in about 50
    return args


def build(args):
    """(model, tokenizer or None, {adapter: sampler(generator) -> (ids, labels, mask)})."""
    if not args.datasets:
        from lora_ext.bench.synthetic import build_default_model

        model = build_default_model(torch.float32, "cpu")
        tasks = data.demo_tasks(DEMO_ADAPTERS, DEMO_SYMBOLS, pairs=8, seed=args.seed)
        samplers = {name: (lambda g, s=sample: (*s(args.batch_size, g), None)) for name, (_, sample) in tasks.items()}
        return model, None, samplers, tasks
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    samplers = {}
    for name, path in args.datasets.items():
        examples = data.read_jsonl(name, path, tokenizer, args.max_len)

        def sample(g, examples=examples):
            picks = torch.randint(0, len(examples), (args.batch_size,), generator=g).tolist()
            return data.pad_rows([examples[i] for i in picks], pad)
        samplers[name] = sample
    return model, tokenizer, samplers, None


def train(mm, samplers, args):
    """Trains every adapter for args.steps steps; returns {adapter: [loss per step]} and tokens/s."""
    from tqdm import tqdm

    names = list(samplers)
    params = [p for n in names for p in mm.adapter_parameters(n)]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, fused=True)  # one pass over every adapter
    g = torch.Generator().manual_seed(args.seed)
    history = {n: [] for n in names}
    tokens, started = 0, time.perf_counter()
    mm.train()
    for _ in tqdm(range(args.steps), desc="training", file=sys.stderr, leave=False):
        parts = [samplers[n](g) for n in names]
        width = max(ids.shape[1] for ids, _, _ in parts)
        ids = torch.cat([torch.nn.functional.pad(p[0], (0, width - p[0].shape[1])) for p in parts])
        labels = torch.cat([torch.nn.functional.pad(p[1], (0, width - p[1].shape[1]), value=data.IGNORE)
                            for p in parts])
        masks = [p[2] if p[2] is not None else torch.ones_like(p[0]) for p in parts]
        mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks])
        rows = [n for n, p in zip(names, parts) for _ in range(p[0].shape[0])]
        out = mm(input_ids=ids, attention_mask=mask, adapter_names=rows)
        total, losses = per_adapter_loss(out.logits, labels, rows)
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for n in names:
            history[n].append(float(losses[n].detach()))
        tokens += int(mask.sum())
    mm.eval()
    return history, tokens / (time.perf_counter() - started)


def demo_accuracy(mm, tasks, seed):
    """accuracy[adapter][task]: how often the adapter answers that task's symbols right; and
    whether "__base__" rows gave the same logits as before training (checked by the caller)."""
    g = torch.Generator().manual_seed(seed + 1)
    accuracy = {}
    with torch.no_grad():
        for task, (table, sample) in tasks.items():
            ids, labels = sample(32, g)
            for adapter in list(tasks) + ["__base__"]:
                logits = mm(input_ids=ids, adapter_names=[adapter] * 32).logits
                predicted = logits[:, 0::2].argmax(-1)  # at each symbol, the next token: its answer
                accuracy.setdefault(adapter, {})[task] = float((predicted == ids[:, 1::2]).float().mean())
    return accuracy


def write_outputs(out_dir, history, report_lines):
    os.makedirs(out_dir, exist_ok=True)
    atomic.write_json(os.path.join(out_dir, "loss.json"), history, indent=1)
    atomic.write_text(os.path.join(out_dir, "loss.txt"), "\n".join(report_lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in history.items():
        ax.plot(losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over the adapter's rows)")
    ax.legend()
    fig.tight_layout()
    with atomic.atomic_path(os.path.join(out_dir, "loss.png")) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def run(args):
    model, _, samplers, tasks = build(args)
    mm = lora_ext.patch_model(model, max_adapters=max(len(samplers), 1), max_rank=args.rank)
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    g = torch.Generator().manual_seed(args.seed)
    for name in samplers:
        mm.add_adapter(name, dict(r=args.rank, lora_alpha=args.alpha or 2 * args.rank, target_modules=targets),
                       generator=g)
    vocab = model.get_input_embeddings().num_embeddings
    probe = torch.randint(0, vocab, (2, 16), generator=g)
    with torch.no_grad():
        base_before = mm(input_ids=probe, adapter_names=["__base__", "__base__"]).logits
    print(f"lora-ext train: {len(samplers)} adapters ({', '.join(samplers)}), rank {args.rank}, {args.steps} steps of "
          f"{args.batch_size} rows each, {torch.get_num_threads()} threads")
    history, tokens_per_s = train(mm, samplers, args)
    lines = [f"{'adapter':10} {'first loss':>10} {'last loss':>10}"]
    lines += [f"{n:10} {h[0]:10.3f} {sum(h[-10:]) / len(h[-10:]):10.3f}" for n, h in history.items()]
    lines.append(f"{tokens_per_s:.0f} training tokens/s")
    code = 0
    if tasks is not None:
        accuracy = demo_accuracy(mm, tasks, args.seed)
        lines += ["", "accuracy of each adapter (rows) on each task (columns):",
                  f"{'':10} " + " ".join(f"{t:>7}" for t in tasks)]
        lines += [f"{a:10} " + " ".join(f"{accuracy[a][t]:7.2f}" for t in tasks) for a in accuracy]
        with torch.no_grad():
            base_after = mm(input_ids=probe, adapter_names=["__base__", "__base__"]).logits
        unchanged = torch.equal(base_before, base_after)
        lines.append(f'"__base__" rows unchanged by training: {unchanged}')
        solved = all(accuracy[t][t] >= 0.9 for t in tasks)
        lines.append("each adapter solves its own task: " + ("yes" if solved else "NO"))
        code = 0 if solved and unchanged else 1
    for name in samplers:
        mm.save_adapter(name, os.path.join(args.out, name), overwrite=True)
    write_outputs(args.out, history, lines)
    print("\n".join(lines))
    print(f"\nwrote {args.out}/: {', '.join(samplers)} (PEFT adapters), loss.json, loss.txt, loss.png")
    return code


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    code = run(args)
    print(f"total time {time.perf_counter() - started:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
