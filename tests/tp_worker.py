"""Run by tests/test_tensor_parallel.py under torch.distributed.run (N processes, gloo): on tiny
Llama, Mistral and Qwen2 models loaded with transformers' tensor parallelism (tp_plan="auto"), a patched
model serves, generates, merges, evicts and trains exactly as the same model in one process.

Usage: tp_worker.py ROOT ARCH [ARCH ...] (GPUs visible: one per rank, NCCL; else CPU and gloo); ROOT/ARCH holds model/, adapters/<name>/ and
bad_adapter/ (tests/test_tensor_parallel.py writes them). Every rank compares against its own
one-process run of the unsharded model and prints "rank R: all checks passed".
"""

import os
import sys
import warnings

import torch
import torch.distributed as dist

import lora_ext
from lora_ext.adapters.config import AdapterError

warnings.simplefilter("ignore")
from transformers import AutoModelForCausalLM  # noqa: E402

# NCCL when the test leaves GPUs visible (one per rank), gloo on CPU otherwise
DEVICE = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
if DEVICE.type == "cuda":
    torch.cuda.set_device(DEVICE)
NAMES = ["sql", "__base__", "chat", "code", "sql", "__base__"]
FP32_RTOL = 1e-5  # float32 logits and gradients, relative to the largest value of the result


def relative_error(got, expected):
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def assert_close(got, expected, what, rtol=FP32_RTOL):
    error = relative_error(got, expected)
    assert error <= rtol, f"rank {dist.get_rank()}: {what}: relative error {error:.3g} > {rtol:g}"


def batch(rows=len(NAMES), length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on a row or two
    mask[min(4, rows - 1), :2] = 0
    ids[mask == 0] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def load(model_dir, tensor_parallel, adapters, **patch_kwargs):
    kwargs = dict(tp_plan="auto") if tensor_parallel else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).to(DEVICE).eval()
    model.generation_config.pad_token_id = 0
    mm = lora_ext.patch_model(model, max_adapters=patch_kwargs.pop("max_adapters", 4), max_rank=16, **patch_kwargs)
    for name, path in adapters.items():
        mm.load_adapter(name, path)
    return mm


def check_serving(root, adapters):
    """Logits, greedy and beam generation of a mixed batch with base rows equal the one-process run."""
    ids, mask = batch()
    one, tp = load(f"{root}/model", False, adapters), load(f"{root}/model", True, adapters)
    assert_close(tp(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits,
                 one(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits, "mixed batch logits")
    base = one.model(input_ids=ids, attention_mask=mask).logits
    assert relative_error(one(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits, base) > 0.01, \
        "the adapters must change the output for this check to mean anything"
    for gen in (dict(max_new_tokens=6, do_sample=False), dict(max_new_tokens=5, num_beams=3, do_sample=False)):
        expected = one.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **gen)
        got = tp.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **gen)
        assert torch.equal(got, expected), f"rank {dist.get_rank()}: generate({gen}) differs from one process"
    return one, tp


def check_adapter_bytes(one, tp, world_size):
    """Each rank keeps A whole and 1/N of B on column-parallel layers, 1/N of A and B whole on
    row-parallel ones."""
    rowwise = ("o_proj", "down_proj")
    for name in ("sql", "chat", "code"):
        record = one.store.record(name)
        expected = 0
        for module, rank in record.ranks.items():
            d_in, d_out = one.layers[module].in_features, one.layers[module].out_features
            if module.endswith(rowwise):
                expected += rank * d_in // world_size + rank * d_out
            else:
                expected += rank * d_in + rank * d_out // world_size
        assert tp.store.adapter_bytes(name) == expected * 4, (name, tp.store.adapter_bytes(name), expected * 4)


def check_churn(root, adapters, one):
    """Two slots for three adapters: every batch evicts; each rank's results and its store's
    counters stay in step with the others and the results with the one-process run."""
    tp = load(f"{root}/model", True, adapters, max_adapters=2)
    ids, mask = batch(rows=2, seed=3)
    for pair in (["sql", "chat"], ["code", "__base__"], ["chat", "code"], ["sql", "code"], ["chat", "sql"]):
        assert_close(tp(input_ids=ids, attention_mask=mask, adapter_names=pair).logits,
                     one(input_ids=ids, attention_mask=mask, adapter_names=pair).logits, f"churn batch {pair}")
    stats = tp.stats()
    assert stats["slot_evictions"] >= 3, stats
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (stats["slot_evictions"], tp.store.resident()))
    assert all(e == everyone[0] for e in everyone), everyone


def check_merge(tp, one):
    """A merged adapter serves its rows through the sharded base weights; unmerge restores them bitwise."""
    ids, mask = batch(rows=2, seed=4)
    before = {m: layer.local_weight().clone() for m, layer in tp.layers.items()}
    if dist.get_rank() == 1:  # a merge that fails on one rank: no rank merges
        layer = next(iter(tp.layers.values()))
        layer.merged = lambda weights, where: (_ for _ in ()).throw(AdapterError(f"{where}: refused here"))
    try:
        tp.merge_adapter("chat")
    except ValueError as e:
        assert ("refused here" if dist.get_rank() == 1 else "could not do its part") in str(e), e
    else:
        raise AssertionError("a merge that failed on one rank went on")
    if dist.get_rank() == 1:
        del layer.merged
    assert tp._merged is None and all(torch.equal(tp.layers[m].local_weight(), w) for m, w in before.items())
    tp.merge_adapter("chat")
    assert_close(tp(input_ids=ids, attention_mask=mask, adapter_names=["chat", "chat"]).logits,
                 one(input_ids=ids, attention_mask=mask, adapter_names=["chat", "chat"]).logits, "merged adapter")
    tp.unmerge_adapter()
    assert all(torch.equal(tp.layers[m].local_weight(), w) for m, w in before.items()), "unmerge is not bitwise"


def check_refusals(root, tp):
    """Mismatched names across ranks, an adapter that does not fit, a layout lora_ext does not know."""
    ids, mask = batch(rows=2, seed=5)
    names = ["sql", "chat"] if dist.get_rank() == 0 else ["chat", "sql"]
    try:
        tp(input_ids=ids, attention_mask=mask, adapter_names=names)
    except ValueError as e:
        assert "different adapter names" in str(e) and "every rank" in str(e), e
    else:
        raise AssertionError("mismatched adapter names across ranks were accepted")
    if dist.get_rank() == 1:  # one rank cannot prepare the batch: every rank raises, none hangs
        tp.unload_adapter("code")
    try:
        tp(input_ids=ids, attention_mask=mask, adapter_names=["code", "sql"])
    except ValueError as e:
        assert ("unknown adapter(s) ['code']" if dist.get_rank() == 1 else "could not do its part") in str(e), e
    else:
        raise AssertionError("a batch one rank could not prepare ran")
    if dist.get_rank() == 1:
        tp.load_adapter("code", f"{root}/adapters/code")
    resident = tp.store.resident()
    try:
        tp.load_adapter("bad", f"{root}/bad_adapter")
    except AdapterError as e:
        assert "'bad'" in str(e) and "mlp" in str(e), e
    else:
        raise AssertionError("an adapter of the wrong shape was accepted")
    assert "bad" not in tp.store and tp.store.resident() == resident
    tp(input_ids=ids, attention_mask=mask, adapter_names=["sql", "chat"])  # still serving, in step on every rank
    head = AutoModelForCausalLM.from_pretrained(f"{root}/model", dtype=torch.float32, tp_plan="auto")
    try:
        lora_ext.patch_model(head, target_modules=["q_proj", "lm_head"])
    except ValueError as e:
        assert "'lm_head'" in str(e) and "colwise_gather_output" in str(e) and "Shard(dim=0)" in str(e), e
    else:
        raise AssertionError("a tensor-parallel style lora_ext does not know was accepted")
    assert not any(isinstance(m, lora_ext.model.lora_layer.LoraLayer) for m in head.modules())


def train_step(root, adapters, tensor_parallel):
    """One forward and backward of a new adapter and a loaded one on a mixed batch: (model,
    {adapter: its leaves' gradients}, loss)."""
    ids, _ = batch(rows=4, seed=6)
    mm = load(f"{root}/model", tensor_parallel, {})
    mm.add_adapter("new", dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
                   generator=torch.Generator().manual_seed(7))
    mm.load_adapter("chat", adapters["chat"], trainable=True)
    mm.train()
    logits = mm(input_ids=ids, adapter_names=["new", "chat", "__base__", "new"]).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return mm, {n: [p.grad for p in mm.adapter_parameters(n)] for n in ("new", "chat")}, loss.detach()


def worst_gradient_error(one, one_grads, tp_grads):
    """The largest difference between a rank's gradient of its shard and the matching slice of
    the one-process gradient, relative to the largest entry of the whole gradient (a rank's slice
    of q_proj's B may hold only small entries)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    worst = (0.0, None)
    for name in ("new", "chat"):
        for i, module in enumerate(one.store.trainable(name).modules):
            rowwise = module.endswith(("o_proj", "down_proj"))
            for which in (0, 1):
                whole, part = one_grads[name][2 * i + which], tp_grads[name][2 * i + which]
                dim = 1 if rowwise and which == 0 else 0 if not rowwise and which == 1 else None
                expected = whole if dim is None else whole.chunk(world, dim=dim)[rank]
                error = ((part.double() - expected.double()).abs().max() / whole.double().abs().max()).item()
                worst = max(worst, (error, f"{name} {module} lora_{'AB'[which]}"))
    return worst


def check_saving(root, one, tp):
    """After an optimizer step on both, the adapter tensor-parallel ranks save together (rank 0
    writes the gathered weights) equals the one-process one; an existing directory is refused on
    every rank."""
    for mm in (one, tp):
        torch.optim.SGD(mm.adapter_parameters("new"), lr=1.0).step()
    out = f"{root}/saved_{DEVICE.type}_{dist.get_world_size()}"
    if dist.get_rank() == 0:
        one.save_adapter("new", f"{out}/one")
    tp.save_adapter("new", f"{out}/tp")
    from safetensors.torch import load_file

    expected, got = (load_file(f"{out}/{which}/adapter_model.safetensors") for which in ("one", "tp"))
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert got[key].shape == expected[key].shape, key
        assert_close(got[key], expected[key], f"saved {key}", rtol=GRAD_RTOL)
    try:
        tp.save_adapter("new", f"{out}/tp")
    except ValueError as e:
        assert "already exists" in str(e), e
    else:
        raise AssertionError("saving over an existing directory was accepted")
    dist.barrier()


# float32 gradients through softmax attention: this one-process run's own gradients differ from
# float64 PEFT's by up to 3e-4 of the largest entry (measured on these models), and the ranks sum
# in another order; a missing reduction is off by far more (check_training proves it fails).
GRAD_RTOL = 2e-3


def check_training(root, adapters):
    """One training step of a new adapter and a loaded one: each rank's gradient of its shard
    equals the matching slice of the one-process gradient; without either of the two gradient
    sums over ranks the check fails."""
    from lora_ext.model import tensor_parallel as tp_module

    one, one_grads, one_loss = train_step(root, adapters, False)
    tp, tp_grads, tp_loss = train_step(root, adapters, True)
    assert_close(tp_loss, one_loss, "training loss")
    error, where = worst_gradient_error(one, one_grads, tp_grads)
    assert error <= GRAD_RTOL, f"rank {dist.get_rank()}: gradient of {where}: relative error {error:.3g}"
    broken = {"replicated halves' gradients not summed": (tp_module.Sharding, "sum_replicated_grads",
                                                          lambda self, a, b: None),
              "column-parallel input gradient not summed": (tp_module._SumGradOverRanks, "apply",
                                                            staticmethod(lambda x, group: x))}
    check_saving(root, one, tp)
    for what, (owner, attr, wrong) in broken.items():
        own = owner.__dict__.get(attr)  # None: inherited (Function.apply)
        setattr(owner, attr, wrong)
        try:
            _, wrong_grads, _ = train_step(root, adapters, True)
        finally:
            setattr(owner, attr, own) if own is not None else delattr(owner, attr)
        error, where = worst_gradient_error(one, one_grads, wrong_grads)
        assert error > 10 * GRAD_RTOL, f"{what}: the check cannot tell ({where}: {error:.3g})"


def check_data_parallel(root, adapters):
    """Data parallelism without tensor parallelism: DistributedDataParallel over TrainerModule,
    each rank on its own rows; every rank's gradient is the mean of the ranks' one-process gradients."""
    from torch.nn.parallel import DistributedDataParallel

    world, rank = dist.get_world_size(), dist.get_rank()

    def module():
        mm = load(f"{root}/model", False, {})
        mm.add_adapter("new", dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
                       generator=torch.Generator().manual_seed(7))
        mm.load_adapter("chat", adapters["chat"], trainable=True)
        return lora_ext.TrainerModule(mm, ["new", "chat"]).train()

    def rows(r):
        ids, _ = batch(rows=3, seed=20 + r)
        return dict(input_ids=ids, labels=ids, adapter_ids=torch.tensor([0, 1, -1 if r % 2 else 0], device=DEVICE))

    expected = None
    for r in range(world):  # what each rank's rows give in one process, averaged
        single = module()
        single(**rows(r)).loss.backward()
        grads = [p.grad / world for p in single.parameters()]
        expected = grads if expected is None else [e + g for e, g in zip(expected, grads)]
    ddp = DistributedDataParallel(module(), device_ids=[DEVICE] if DEVICE.type == "cuda" else None,
                                  find_unused_parameters=True)
    ddp(**rows(rank)).loss.backward()
    for (name, p), e in zip(ddp.module.named_parameters(), expected):
        assert_close(p.grad, e, f"data-parallel gradient of {name}", rtol=GRAD_RTOL)


def main():
    root, archs = sys.argv[1], sys.argv[2:]
    for arch in archs:
        adapters = {n: f"{root}/{arch}/adapters/{n}" for n in ("sql", "chat", "code")}
        one, tp = check_serving(f"{root}/{arch}", adapters)
        world_size = dist.get_world_size()
        check_adapter_bytes(one, tp, world_size)
        check_churn(f"{root}/{arch}", adapters, one)
        check_merge(tp, one)
        check_refusals(f"{root}/{arch}", tp)
        check_training(f"{root}/{arch}", adapters)
        check_data_parallel(f"{root}/{arch}", adapters)
        print(f"rank {dist.get_rank()}: {arch} on {world_size} ranks passed", flush=True)
    dist.barrier()
    print(f"rank {dist.get_rank()}: all checks passed", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
