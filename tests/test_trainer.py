"""transformers.Trainer trains several adapters at once through lora_ext.TrainerModule: the
weights it ends with equal the plain training loop's (test_training.py proves that loop equal to
PEFT training each adapter alone), base rows take no part, and bad rows are refused."""

import pytest
import torch

import lora_ext
from test_training import ADAPTERS, ROWS, batch, patched, train_lora_ext, weights_of

transformers = pytest.importorskip("transformers")
NAMES = list(ADAPTERS)


def rows_dataset(ids, names):
    """Trainer's rows: a dict per sequence, its adapter by index (-1: the base model)."""
    index = {n: i for i, n in enumerate(NAMES)}
    return [dict(input_ids=ids[i], labels=ids[i], adapter_ids=index.get(n, -1)) for i, n in enumerate(names)]


def trainer_for(module, dataset, tmp_path, steps):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=len(dataset), learning_rate=1e-3,
        weight_decay=0.1, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, optim="adamw_torch",
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, dataloader_drop_last=False)
    return transformers.Trainer(model=module, args=args, train_dataset=dataset)


def test_trainer_ends_where_the_training_loop_ends(tmp_path):
    """Three steps of Trainer (whole batch per step, constant learning rate, AdamW with weight
    decay, no clipping) against three steps of the loop with the same AdamW: float32, 1e-5."""
    ids = batch()
    mm, loop = patched(), patched()
    start = {name: weights_of(mm, name) for name in NAMES}
    trainer_for(lora_ext.TrainerModule(mm, NAMES), rows_dataset(ids, ROWS), tmp_path, steps=3).train()
    train_lora_ext(loop, 3, ids, lr=1e-3, weight_decay=0.1)
    for name in NAMES:
        for module, (a, b) in weights_of(mm, name).items():
            ref_a, ref_b = weights_of(loop, name)[module]
            for ours, theirs in ((a, ref_a), (b, ref_b)):
                rel = float((ours - theirs).norm() / theirs.norm())
                assert rel < 1e-5, f"{name} {module}: relative difference {rel:.2e}"
            assert not torch.equal(a, start[name][module][0]), f"{name} did not train"


def test_module_parameters_are_the_adapters_leaves():
    mm = patched()
    module = lora_ext.TrainerModule(mm, ["sql"])
    leaves = mm.adapter_parameters("sql")
    assert [id(p) for p in module.parameters()] == [id(p) for p in leaves]
    assert all(not p.requires_grad for p in mm.model.parameters()), "the base must stay frozen"


def test_bad_adapter_ids_and_names_are_refused():
    mm = patched()
    module = lora_ext.TrainerModule(mm, NAMES)
    ids = batch(rows=2)
    with pytest.raises(ValueError, match="adapter_ids entry 3 is not an index into 3 adapters"):
        module(input_ids=ids, labels=ids, adapter_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="needs adapter_ids"):
        module(input_ids=ids, labels=ids)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        lora_ext.TrainerModule(mm, ["sql", "nope"])
    with pytest.raises(lora_ext.AdapterError, match="repeat"):
        lora_ext.TrainerModule(mm, ["sql", "sql"])


def test_a_batch_of_base_rows_only_trains_nothing():
    """Trainer calls backward on every batch's loss: one with only base rows must allow it and
    leave every adapter without a gradient."""
    mm = patched()
    module = lora_ext.TrainerModule(mm, NAMES).train()
    ids = batch(rows=2)
    module(input_ids=ids, labels=ids, adapter_ids=torch.tensor([-1, -1])).loss.backward()
    assert all(p.grad is None for p in module.parameters())
