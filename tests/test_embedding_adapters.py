"""Embedding adapters (PEFT's lora_embedding_A / lora_embedding_B on nn.Embedding) mixed row by row
with linear adapters and base rows, against PEFT adapter by adapter: logits, greedy generation,
eviction and reload, merge and unmerge; and the inputs that are refused."""

import pytest
import torch

import lora_ext
import peft_oracle as oracle
from peft_oracle import EMBEDDING, LINEAR, relative_error
from tiny_models import build_model, save_adapter

pytest.importorskip("peft")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FP32_RTOL = 1e-5  # float32 logits against PEFT in float64, relative to the largest logit of the rows compared
NAMES = ["emb", "__base__", "plain", "emb_only", "emb", "plain", "__base__", "emb_only"]


def configs(arch):
    return dict(emb=dict(r=8, lora_alpha=16, target_modules=[LINEAR[arch], EMBEDDING[arch]]),
                emb_only=dict(r=4, lora_alpha=4, use_rslora=True, target_modules=[EMBEDDING[arch]]),
                plain=dict(r=4, lora_alpha=8, target_modules=[LINEAR[arch]]))


@pytest.fixture(scope="module", params=list(EMBEDDING))
def arch_paths(request, tmp_path_factory):
    arch = request.param
    return arch, oracle.save_adapters(arch, tmp_path_factory.mktemp(arch), configs(arch), seed=50)


def ours(arch, paths, device="cpu", max_adapters=4):
    return oracle.patched(arch, paths, device, max_adapters, target_modules=["all-linear", EMBEDDING[arch]])


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_logits_match_peft_adapter_by_adapter(arch_paths, device):
    arch, paths = arch_paths
    ids, mask = oracle.batch(device, len(NAMES))
    got = ours(arch, paths, device)(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    oracle.assert_matches_peft(got, arch, paths, ids, mask, NAMES, FP32_RTOL, device)
    base = build_model(arch).to(device)(input_ids=ids, attention_mask=mask).logits
    rows = oracle.rows_of("emb_only", NAMES)  # an adapter on the embedding alone changes the output
    assert relative_error(got[rows], base[rows]) > 100 * FP32_RTOL


def test_the_check_fails_if_a_token_takes_another_column(arch_paths, monkeypatch):
    """A layer that adds the wrong token's column of A (the next token id) fails by far."""
    arch, paths = arch_paths
    ids, mask = oracle.batch("cpu", len(NAMES))
    expected = oracle.expected_logits(arch, paths, ids, mask, NAMES)
    mm = ours(arch, paths)
    layer = next(layer for layer in mm.layers.values() if layer.is_embedding)
    forward = layer._embedding_forward
    monkeypatch.setattr(layer, "_embedding_forward", lambda batch, base, x: forward(batch, base, (x + 1) % 96)
                        - base((x + 1) % 96) + base(x))
    got = mm(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    rows = oracle.rows_of("emb_only", NAMES)
    assert relative_error(got[rows], expected[rows]) > 100 * FP32_RTOL


def test_greedy_generation_matches_peft(arch_paths):
    arch, paths = arch_paths
    ids, mask = oracle.batch("cpu", len(NAMES))
    got = ours(arch, paths).generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, do_sample=False,
                                     max_new_tokens=6)
    for name, expected in oracle.expected_generation(arch, paths, ids, mask, NAMES, max_new_tokens=6).items():
        assert torch.equal(got[oracle.rows_of(name, NAMES)], expected), name


def test_eviction_and_reload_under_churn(arch_paths):
    arch, paths = arch_paths
    mm = ours(arch, paths, max_adapters=2)
    ids, mask = oracle.batch("cpu", 2, seed=3)
    for pair in (["emb", "plain"], ["emb_only", "emb"], ["plain", "emb_only"], ["emb", "__base__"]):
        oracle.assert_matches_peft(mm(input_ids=ids, attention_mask=mask, adapter_names=pair).logits, arch, paths,
                                   ids, mask, pair, FP32_RTOL)
    assert mm.stats()["slot_evictions"] >= 2


def test_merge_and_unmerge_match_peft_merged(arch_paths):
    """Merged as PEFT merges (the embedding weight plus c (B A)^T; GPT-2's lm_head shares it, in
    PEFT too); unmerge restores every weight bitwise."""
    arch, paths = arch_paths
    mm = ours(arch, paths)
    ids, mask = oracle.batch("cpu", 2, seed=4)
    before = {n: p.detach().clone() for n, p in mm.model.named_parameters()}
    peft = oracle.peft_alone(arch, paths["emb"])
    peft.merge_adapter()
    with torch.no_grad():
        expected = peft(input_ids=ids, attention_mask=mask).logits
    mm.merge_adapter("emb")
    assert relative_error(mm(input_ids=ids, attention_mask=mask, adapter_names=["emb", "emb"]).logits,
                          expected) <= 1e-4  # merged weights are rounded once more
    mm.unmerge_adapter()
    assert all(torch.equal(p, before[n]) for n, p in mm.model.named_parameters())


def test_a_changed_base_copy_is_refused(tmp_path):
    """PEFT saves an embedding adapter with the embedding's base weight; a copy that differs from
    the model's (a resized or retrained vocabulary) is refused, nothing registered."""
    from safetensors.torch import load_file, save_file

    path = save_adapter("llama", str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=["embed_tokens"])
    tensors = load_file(f"{path}/adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("base_layer.weight"))
    tensors[key][3] += 1.0
    save_file(tensors, f"{path}/adapter_model.safetensors")
    mm = lora_ext.patch_model(build_model("llama"), target_modules=["embed_tokens"], max_rank=8)
    with pytest.raises(lora_ext.AdapterError, match=r"adapter 'a': module 'model.embed_tokens': .* its own base_layer "
                                                    r"weight \(96, 64\), which differs from the model's"):
        mm.load_adapter("a", path)
    assert mm.adapters() == []


def test_dora_on_an_embedding_refused(tmp_path):
    path = save_adapter("llama", str(tmp_path / "d"), r=4, lora_alpha=8, use_dora=True,
                        target_modules=["q_proj", "embed_tokens"])
    mm = lora_ext.patch_model(build_model("llama"), target_modules=["all-linear", "embed_tokens"], max_rank=8)
    with pytest.raises(lora_ext.AdapterError, match=r"module 'model.embed_tokens': DoRA on an embedding layer"):
        mm.load_adapter("d", path)
    mm.add_adapter("g", dict(r=4, lora_alpha=8, target_modules="all-linear"))  # PEFT's all-linear: no embedding
    assert all(not mm.layers[m].is_embedding for m in mm.store.trainable("g").modules)
    assert [a["name"] for a in mm.adapters()] == ["g"]


def test_training_an_embedding_adapter_matches_peft(tmp_path):
    """A new embedding adapter and one loaded from a file, trained in one mixed batch with a base
    row: each leaf's gradient equals PEFT's for that adapter alone on its rows; the trained
    adapter saves as a PEFT directory that PEFT serves as lora_ext does."""
    from peft import LoraConfig, get_peft_model

    from lora_ext.losses import per_adapter_loss

    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    mm = lora_ext.patch_model(build_model("llama"), target_modules=["all-linear", "embed_tokens"], max_rank=8)
    mm.add_adapter("new", config, generator=torch.Generator().manual_seed(1))
    loaded = save_adapter("llama", str(tmp_path / "loaded"), seed=2,
                          **{k: v for k, v in config.items() if k != "init_lora_weights"})
    mm.load_adapter("loaded", loaded, trainable=True)
    names = ["new", "__base__", "loaded", "new"]
    ids = torch.randint(3, 96, (4, 9), generator=torch.Generator().manual_seed(3))
    references = {}
    for name in ("new", "loaded"):
        model = get_peft_model(build_model("llama"), LoraConfig(**config))
        with torch.no_grad():
            for module, w in mm.store.trainable(name).modules.items():
                layer = model.get_submodule(f"base_model.model.{module}")
                if module.endswith("embed_tokens"):
                    layer.lora_embedding_A["default"].copy_(w.lora_a)
                    layer.lora_embedding_B["default"].copy_(w.lora_b)
                else:
                    layer.lora_A["default"].weight.copy_(w.lora_a)
                    layer.lora_B["default"].weight.copy_(w.lora_b)
        references[name] = model
    mm.train()
    per_adapter_loss(mm(input_ids=ids, adapter_names=names).logits, ids, names)[0].backward()
    for name, model in references.items():
        rows = oracle.rows_of(name, names)
        logits = model(input_ids=ids[rows]).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), ids[rows][:, 1:].reshape(-1)).backward()
        for module, w in mm.store.trainable(name).modules.items():
            layer = model.get_submodule(f"base_model.model.{module}")
            theirs = ((layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]) if module.endswith(
                "embed_tokens") else (layer.lora_A["default"].weight, layer.lora_B["default"].weight))
            for ours, their in zip((w.lora_a, w.lora_b), theirs):
                rel = float((ours.grad - their.grad).norm() / their.grad.norm())
                assert rel < 1e-5, f"{name} {module}: gradient relative difference {rel:.2e}"
    torch.optim.SGD(mm.adapter_parameters("new"), lr=1.0).step()
    mm.eval()
    mm.save_adapter("new", tmp_path / "saved")
    ids, mask = oracle.batch("cpu", 2, seed=4)
    oracle.assert_matches_peft(mm(input_ids=ids, attention_mask=mask, adapter_names=["new", "new"]).logits, "llama",
                               {"new": str(tmp_path / "saved")}, ids, mask, ["new", "new"], FP32_RTOL)
