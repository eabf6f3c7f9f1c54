"""Training many adapters at once: each adapter ends exactly where PEFT training it alone ends;
absent adapters get no gradient; a bad loss stays in its adapter; the base stays frozen; dropout,
precision, gradient checkpointing; saving as PEFT directories; serving what was trained; bad input."""

import os

import pytest
import torch

import lora_ext
from lora_ext.losses import per_adapter_loss
from tiny_models import build_model

peft = pytest.importorskip("peft")

ADAPTERS = {
    "sql": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "chat": dict(r=8, lora_alpha=16, target_modules="all-linear", rank_pattern={"down_proj": 2},
                 alpha_pattern={"o_proj": 5.0}, init_lora_weights=False),
    "code": dict(r=6, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "up_proj", "down_proj"],
                 layers_to_transform=[1], init_lora_weights=False),
}
ROWS = ["chat", "__base__", "sql", "code", "sql", "chat"]  # unsorted, with a base row
VOCAB = 96


def patched(dtype=torch.float32, adapters=ADAPTERS, max_rank=16, max_adapters=4):
    mm = lora_ext.patch_model(build_model("llama", dtype), max_adapters=max_adapters, max_rank=max_rank)
    g = torch.Generator().manual_seed(3)
    for name, config in adapters.items():
        mm.add_adapter(name, config, generator=g)
    return mm


def batch(seed=0, rows=len(ROWS), length=10):
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def weights_of(mm, name):
    trainable = mm.store.trainable(name)
    return {m: (w.lora_a.detach().clone(), w.lora_b.detach().clone()) for m, w in trainable.modules.items()}


def peft_model_with(name, config, weights, dtype=torch.float32):
    """PEFT's model of one adapter, on the same base, with the given starting weights."""
    model = peft.get_peft_model(build_model("llama", dtype), peft.LoraConfig(**config))
    targeted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")
                and "default" in m.lora_A}
    assert targeted == set(weights), "lora_ext and PEFT chose different modules"
    with torch.no_grad():
        for module, (a, b) in weights.items():
            layer = model.get_submodule(f"base_model.model.{module}")
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    return model


def train_lora_ext(mm, steps, ids, names=ROWS, **adamw):
    opt = torch.optim.AdamW([p for n in mm.store.trainable_names() for p in mm.adapter_parameters(n)], **adamw)
    mm.train()
    for _ in range(steps):
        total, _ = per_adapter_loss(mm(input_ids=ids, adapter_names=names).logits, ids, names)
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    mm.eval()


def train_peft_alone(model, steps, ids, **adamw):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **adamw)
    model.train()
    for _ in range(steps):
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def test_each_adapter_ends_where_peft_training_it_alone_ends():
    """Three adapters (different ranks, targets, rank/alpha patterns, rsLoRA) trained jointly for
    four AdamW steps (weight decay on) in mixed unsorted batches with a base row: each equals the
    same adapter trained alone with PEFT on its own rows, float32, within 1e-5 relative. (Adam's
    first steps divide each gradient by its own size, so float32 rounding differences in gradients
    near zero become whole update differences: at lr 1e-2 they reach 2e-5 of a weight's norm, at
    lr 1e-3 they stay near 1e-6; the gradients themselves are compared directly below.)"""
    adamw = dict(lr=1e-3, weight_decay=0.1)
    mm, ids = patched(), batch()
    start = {name: weights_of(mm, name) for name in ADAPTERS}
    train_lora_ext(mm, 4, ids, **adamw)
    for name, config in ADAPTERS.items():
        rows = [i for i, n in enumerate(ROWS) if n == name]
        reference = train_peft_alone(peft_model_with(name, config, start[name]), 4, ids[rows], **adamw)
        for module, (a, b) in weights_of(mm, name).items():
            layer = reference.get_submodule(f"base_model.model.{module}")
            for ours, theirs in ((a, layer.lora_A["default"].weight), (b, layer.lora_B["default"].weight)):
                rel = float((ours - theirs.detach()).norm() / theirs.detach().norm())
                assert rel < 1e-5, f"{name} {module}: relative difference {rel:.2e}"
            assert not torch.equal(a, start[name][module][0]), "the adapter did not train"


def test_first_step_gradients_equal_peft_alone():
    """The joint loss's gradient for each adapter against PEFT's for that adapter alone on its rows."""
    mm, ids = patched(), batch()
    start = {name: weights_of(mm, name) for name in ADAPTERS}
    mm.train()
    total, _ = per_adapter_loss(mm(input_ids=ids, adapter_names=ROWS).logits, ids, ROWS)
    total.backward()
    for name, config in ADAPTERS.items():
        rows = [i for i, n in enumerate(ROWS) if n == name]
        reference = peft_model_with(name, config, start[name])
        logits = reference(input_ids=ids[rows]).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[rows][:, 1:].reshape(-1)).backward()
        for module, w in mm.store.trainable(name).modules.items():
            layer = reference.get_submodule(f"base_model.model.{module}")
            for ours, theirs in ((w.lora_a.grad, layer.lora_A["default"].weight.grad),
                                 (w.lora_b.grad, layer.lora_B["default"].weight.grad)):
                rel = float((ours - theirs).norm() / theirs.norm())
                assert rel < 1e-5, f"{name} {module}: gradient relative difference {rel:.2e}"


def test_an_absent_adapter_gets_no_gradient_and_does_not_move():
    mm = patched(adapters={**ADAPTERS, "idle": dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                     init_lora_weights=False)})
    before = [p.detach().clone() for p in mm.adapter_parameters("idle")]
    train_lora_ext(mm, 2, batch(), lr=1e-2, weight_decay=0.1)  # AdamW with weight decay
    for p, old in zip(mm.adapter_parameters("idle"), before):
        assert p.grad is None and torch.equal(p, old)


def test_a_nan_loss_stays_in_its_adapter():
    ids = batch()
    grads = {}
    for poison in (False, True):
        mm = patched()
        mm.train()
        _, losses = per_adapter_loss(mm(input_ids=ids, adapter_names=ROWS).logits, ids, ROWS)
        total = sum(loss * (float("nan") if poison and name == "code" else 1.0) for name, loss in losses.items())
        total.backward()
        grads[poison] = {n: [p.grad.clone() for p in mm.adapter_parameters(n)] for n in ADAPTERS}
        if poison:
            assert mm.nonfinite_gradients() == ["code"]
    for name in ("sql", "chat"):
        for clean, dirty in zip(grads[False][name], grads[True][name]):
            assert torch.equal(clean, dirty)


def test_the_base_stays_frozen():
    mm = patched()
    ids = batch()
    train_lora_ext(mm, 1, ids, lr=1e-2)
    base_params = list(mm.model.parameters())
    assert base_params and all(not p.requires_grad and p.grad is None for p in base_params)


def test_bfloat16_base_trains_float32_adapters():
    mm = patched(torch.bfloat16)
    params = mm.adapter_parameters("chat")
    assert all(p.dtype == torch.float32 for p in params)
    train_lora_ext(mm, 2, batch(), lr=1e-2)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)


def step_grads(mm, ids, names, seed):
    torch.manual_seed(seed)
    mm.train()
    total, _ = per_adapter_loss(mm(input_ids=ids, adapter_names=names).logits, ids, names)
    total.backward()
    grads = [p.grad.clone() for n in mm.store.trainable_names() for p in mm.adapter_parameters(n)]
    for n in mm.store.trainable_names():
        for p in mm.adapter_parameters(n):
            p.grad = None
    return grads


def test_gradient_checkpointing_gives_the_same_gradients():
    config = {**ADAPTERS, "drop": dict(r=4, lora_alpha=8, target_modules=["v_proj", "gate_proj"], lora_dropout=0.3,
                                       init_lora_weights=False)}
    names = ROWS[:-1] + ["drop"]
    ids = batch()
    plain = step_grads(patched(adapters=config), ids, names, seed=5)
    mm = patched(adapters=config)
    mm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = step_grads(mm, ids, names, seed=5)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_dropout_is_per_row_unbiased_and_the_backward_uses_the_same_mask():
    """Each row's LoRA input is dropped with its adapter's probability (the base sees it whole):
    averaged over draws the delta is the undropped one; each draw's gradient equals the gradient
    of that very draw's output (checked through the output's own autograd: a linear function of
    the weights, so d(out . g)/dA recomputed from the saved output is exact)."""
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    mm = patched(adapters={"d": dict(config, lora_dropout=0.5), "n": config})
    layer = mm.layers["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 3, 64)
    mm.train()
    from lora_ext.model.batch import active_batch
    from lora_ext.model.train_batch import TrainBatch

    deltas = []
    for _ in range(400):
        with active_batch(TrainBatch(mm, ["d", "n"], mm.store, torch.device("cpu"))):
            deltas.append((layer(x) - layer.base_layer(x)).detach())
    deltas = torch.stack(deltas)
    mm.store.trainable("d").dropout = 0.0  # the same adapter without dropout, for the expectation
    with active_batch(TrainBatch(mm, ["d", "n"], mm.store, torch.device("cpu"))):
        expected = (layer(x) - layer.base_layer(x)).detach()
    # (without any dropout the batch runs through linear_lora, whose rounding differs from base + delta)
    torch.testing.assert_close(deltas[:, 1], expected[1].expand_as(deltas[:, 1]), rtol=1e-5, atol=1e-6,
                               msg="the row without dropout changed")
    spread = deltas[:, 0].std(0).mean()
    assert spread > 0.1 * expected[0].abs().mean(), "dropout did not vary the row"
    err = (deltas[:, 0].mean(0) - expected[0]).abs().mean() / expected[0].abs().mean()
    assert err < 0.15, f"dropped rows' mean is {err:.2f} off the undropped delta"


def test_the_backward_uses_the_forward_dropout_mask(monkeypatch):
    """dA of a dropped row equals the reference gradient of the delta computed on that very
    dropped input (captured from the forward), not on the undropped one."""
    from lora_ext.model import lora_layer
    from lora_ext.reference import lora_delta_ref

    mm = patched(adapters={"d": dict(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.5,
                                     init_lora_weights=False)})
    layer = mm.layers["model.layers.0.self_attn.q_proj"]
    seen = {}
    real = lora_layer.ops.lora_delta

    def capture(rows, *args):
        seen["rows"], seen["args"] = rows.detach().clone(), args
        return real(rows, *args)
    monkeypatch.setattr(lora_layer.ops, "lora_delta", capture)
    from lora_ext.model.batch import active_batch
    from lora_ext.model.train_batch import TrainBatch

    mm.train()
    x = torch.randn(1, 5, 64)
    g = torch.randn(1, 5, 64)
    with active_batch(TrainBatch(mm, ["d"], mm.store, torch.device("cpu"))):
        (layer(x) * g).sum().backward()
    w = mm.store.trainable("d").modules["model.layers.0.self_attn.q_proj"]
    dropped = seen["rows"]
    assert (dropped == 0).any() and not torch.equal(dropped, x.reshape(-1, 64)), "nothing was dropped"
    a, b = w.lora_a.detach().double().requires_grad_(), w.lora_b.detach().double().requires_grad_()
    slot_ids = seen["args"][2]
    ref = lora_delta_ref(dropped.double(), a[None], b[None], slot_ids, torch.tensor([w.scaling]), None,
                         compute_dtype=torch.float64)
    (ref * g.reshape(-1, 64).double()).sum().backward()
    torch.testing.assert_close(w.lora_a.grad.double(), a.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.lora_b.grad.double(), b.grad, rtol=1e-5, atol=1e-6)


# ---- saving and serving ---------------------------------------------------------------------------

def test_saved_adapters_load_in_peft_and_back_in_lora_ext(tmp_path):
    mm, ids = patched(), batch()
    train_lora_ext(mm, 2, ids, lr=1e-2)
    for name in ADAPTERS:
        mm.save_adapter(name, tmp_path / name)
        assert sorted(os.listdir(tmp_path / name)) == ["adapter_config.json", "adapter_model.safetensors"]
    reference = peft.PeftModel.from_pretrained(build_model("llama"), str(tmp_path / "sql"), adapter_name="sql")
    for name in ("chat", "code"):
        reference.load_adapter(str(tmp_path / name), adapter_name=name)
    reference.eval()
    with torch.no_grad():
        ours = mm(input_ids=ids, adapter_names=ROWS).logits  # serving the trained weights, no reload
        theirs = reference(input_ids=ids, adapter_names=ROWS).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    again = lora_ext.patch_model(build_model("llama"), max_adapters=4, max_rank=16)
    for name in ADAPTERS:
        again.load_adapter(name, tmp_path / name, trainable=True)
        for module, (a, b) in weights_of(mm, name).items():
            w = again.store.trainable(name).modules[module]
            assert torch.equal(w.lora_a, a) and torch.equal(w.lora_b, b)


def test_saving_refuses_to_overwrite_and_a_failed_save_keeps_the_old(tmp_path, monkeypatch):
    mm = patched()
    target = tmp_path / "sql"
    mm.save_adapter("sql", target)
    before = (target / "adapter_model.safetensors").read_bytes()
    with pytest.raises(lora_ext.AdapterError, match="already exists; pass overwrite=True"):
        mm.save_adapter("sql", target)
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with torch.no_grad():
        mm.adapter_parameters("sql")[0].add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        mm.save_adapter("sql", target, overwrite=True)
    assert (target / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["sql"], "a temporary folder was left behind"


def test_serving_follows_training_steps():
    """Served batches use the trained weights after each step (no reload): the slot copy is
    refreshed when the weights changed."""
    mm, ids = patched(), batch()
    with torch.no_grad():
        first = mm(input_ids=ids, adapter_names=ROWS).logits
    train_lora_ext(mm, 1, ids, lr=1e-1)
    with torch.no_grad():
        second = mm(input_ids=ids, adapter_names=ROWS).logits
    assert not torch.allclose(first[0], second[0]), "the served adapter did not change after training"
    torch.testing.assert_close(first[1], second[1])  # the base row did not change


# ---- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("config,pattern", [
    (dict(r=32, lora_alpha=8, target_modules=["q_proj"]), r"rank 32 exceeds max_rank=16"),
    (dict(r=4, lora_alpha=8, target_modules=["nothing_like_this"]), r"targets none of the patched modules"),
    (dict(r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True), r"lora_bias=True needs a base layer with a bias"),
    (dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
     r"modules_to_save=\[.lm_head.\] names no module the model serves copies of"),
    (dict(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=1.5), r"'lora_dropout' must be a number in \[0, 1\)"),
    (dict(r=4, lora_alpha=float("inf"), target_modules=["q_proj"]), r"'lora_alpha'"),
    (dict(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa"), r"init_lora_weights='pissa'"),
    ("r=4", r"must be a peft.LoraConfig or a dict"),
])
def test_bad_adapter_configs_refused_and_nothing_changes(config, pattern):
    mm = patched()
    before = mm.adapters()
    with pytest.raises(lora_ext.AdapterError, match=pattern):
        mm.add_adapter("new", config)
    assert mm.adapters() == before


def test_bad_training_calls_refused(tmp_path):
    mm = patched()
    from tiny_models import save_adapter as save_peft

    mm.load_adapter("frozen", save_peft("llama", str(tmp_path / "f"), r=4, lora_alpha=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"unknown adapter 'zz'"):
        mm.adapter_parameters("zz")
    with pytest.raises(lora_ext.AdapterError, match=r"adapter 'frozen' is not trainable: load it with "
                       r"load_adapter\(\.\.\., trainable=True\)"):
        mm.adapter_parameters("frozen")
    with pytest.raises(ValueError, match=r"already loaded"):
        mm.add_adapter("sql", ADAPTERS["sql"])
    mm.train()
    with pytest.raises(ValueError, match=r"adapter_names has 2 entries but the batch has 6 rows"):
        mm(input_ids=batch(), adapter_names=["sql", "chat"])
    with pytest.raises(lora_ext.AdapterError, match=r"'frozen' is not trainable, so lora_ext has no weights"):
        mm.save_adapter("frozen", tmp_path / "x")


def test_peft_lora_config_objects_are_accepted():
    mm = lora_ext.patch_model(build_model("llama"), max_adapters=2, max_rank=16)
    mm.add_adapter("p", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.05))
    assert len(mm.adapter_parameters("p")) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    a, b = mm.adapter_parameters("p")[:2]
    assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) > 0  # PEFT's default init

