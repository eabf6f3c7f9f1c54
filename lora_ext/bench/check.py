"""The correctness check before any timing: greedy tokens of lora_ext against PEFT's for every row."""

import torch

from lora_ext.bench.workload import peft_model, row_names

CHECK_TOKENS = 8  # greedy tokens compared per row (fewer with --new-tokens below it)


def check_tokens(workload):
    """Greedy decoding of the N-adapter batch under lora_ext and under PEFT, in float32 (where the
    two must pick the same tokens). Returns a result dict: checked, and when checked rows,
    rows_matching, mismatched_rows, ok."""
    args = workload.args
    if args.no_peft:
        return dict(checked=False, reason="--no-peft")
    try:
        import peft  # noqa: F401  (only to know whether it is installed)
    except ImportError:
        return dict(checked=False, reason="peft is not installed")
    names = row_names(workload.main_names[:args.num_adapters], args.batch_size)
    distinct = list(dict.fromkeys(names))
    new = min(args.new_tokens, CHECK_TOKENS)
    kwargs = dict(input_ids=workload.ids, attention_mask=workload.mask, max_new_tokens=new, min_new_tokens=new,
                  do_sample=False, adapter_names=names)
    ours = workload.patched(workload.model(torch.float32), distinct).generate(**kwargs)
    reference = peft_model(workload.model(torch.float32), {n: workload.paths[n] for n in distinct}).generate(**kwargs)
    same = (ours == reference).all(dim=1)
    return dict(checked=True, dtype="float32", rows=len(names), new_tokens=new, rows_matching=int(same.sum()),
                mismatched_rows=[int(i) for i in (~same).nonzero().flatten()], ok=bool(same.all()))


def describe(correctness):
    """The check's one-line outcome."""
    if not correctness["checked"]:
        return f"not checked ({correctness['reason']})"
    return f"{correctness['rows_matching']}/{correctness['rows']} rows identical"
