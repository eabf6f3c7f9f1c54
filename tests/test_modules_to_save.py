"""modules_to_save (an adapter's own full copy of lm_head or of the embedding) mixed row by row with
plain adapters and base rows, against PEFT adapter by adapter: logits, greedy and beam generation,
eviction and reload, merge and unmerge (GPT-2's tied lm_head and embedding stay tied); and the
inputs that are refused."""

import pytest
import torch

import lora_ext
import peft_oracle as oracle
from lora_ext.model.saved_module import SavedModuleLayer
from peft_oracle import EMBEDDING, LINEAR, relative_error
from tiny_models import build_model, save_adapter

pytest.importorskip("peft")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FP32_RTOL = 1e-5  # float32 logits against PEFT in float64, relative to the largest logit of the rows compared
NAMES = ["head", "__base__", "plain", "embed", "head", "plain", "__base__", "embed"]


def configs(arch):
    return dict(head=dict(r=8, lora_alpha=16, target_modules=[LINEAR[arch]], modules_to_save=["lm_head"]),
                embed=dict(r=4, lora_alpha=8, target_modules=[LINEAR[arch]], modules_to_save=[EMBEDDING[arch]]),
                plain=dict(r=4, lora_alpha=8, target_modules=[LINEAR[arch]]))


@pytest.fixture(scope="module", params=list(EMBEDDING))
def arch_paths(request, tmp_path_factory):
    arch = request.param
    return arch, oracle.save_adapters(arch, tmp_path_factory.mktemp(arch), configs(arch), seed=70)


def ours(arch, paths, device="cpu", max_adapters=4):
    return oracle.patched(arch, paths, device, max_adapters, modules_to_save=["lm_head", EMBEDDING[arch]])


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_logits_match_peft_adapter_by_adapter(arch_paths, device):
    arch, paths = arch_paths
    ids, mask = oracle.batch(device, len(NAMES))
    got = ours(arch, paths, device)(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    oracle.assert_matches_peft(got, arch, paths, ids, mask, NAMES, FP32_RTOL, device)


def test_the_check_fails_if_the_copies_are_ignored(arch_paths, monkeypatch):
    arch, paths = arch_paths
    ids, mask = oracle.batch("cpu", len(NAMES))
    expected = oracle.expected_logits(arch, paths, ids, mask, NAMES)
    monkeypatch.setattr(SavedModuleLayer, "forward", lambda self, x, *a, **k: self.base_layer(x, *a, **k))
    got = ours(arch, paths)(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    for name in ("head", "embed"):
        rows = oracle.rows_of(name, NAMES)
        assert relative_error(got[rows], expected[rows]) > 100 * FP32_RTOL, name


@pytest.mark.parametrize("generation", [dict(max_new_tokens=6), dict(max_new_tokens=5, num_beams=3)],
                         ids=["greedy", "beams"])
def test_generation_matches_peft(arch_paths, generation):
    arch, paths = arch_paths
    ids, mask = oracle.batch("cpu", len(NAMES))
    got = ours(arch, paths).generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, do_sample=False,
                                     **generation)
    for name, expected in oracle.expected_generation(arch, paths, ids, mask, NAMES, **generation).items():
        assert torch.equal(got[oracle.rows_of(name, NAMES)], expected), name


def test_eviction_and_reload_under_churn(arch_paths):
    arch, paths = arch_paths
    mm = ours(arch, paths, max_adapters=2)
    ids, mask = oracle.batch("cpu", 2, seed=3)
    for pair in (["head", "embed"], ["plain", "head"], ["embed", "plain"], ["head", "__base__"], ["plain", "embed"]):
        oracle.assert_matches_peft(mm(input_ids=ids, attention_mask=mask, adapter_names=pair).logits, arch, paths,
                                   ids, mask, pair, FP32_RTOL)
    assert mm.stats()["slot_evictions"] >= 3


def test_merge_and_unmerge(arch_paths):
    """A merged adapter's copies serve every row; unmerge restores every parameter bitwise, and a
    tied lm_head and embedding are still one tensor."""
    arch, paths = arch_paths
    mm = ours(arch, paths)
    ids, mask = oracle.batch("cpu", 2, seed=4)
    before = {n: p.detach().clone() for n, p in mm.model.named_parameters()}
    tied = mm.model.get_output_embeddings().weight is mm.model.get_input_embeddings().weight
    for name in ("head", "embed"):
        expected = oracle.expected_logits(arch, paths, ids, mask, [name, name])
        mm.merge_adapter(name)
        assert relative_error(mm(input_ids=ids, attention_mask=mask, adapter_names=[name, name]).logits,
                              expected) <= 1e-4, name
        mm.unmerge_adapter()
        assert all(torch.equal(p, before[n]) for n, p in mm.model.named_parameters()), name
        assert (mm.model.get_output_embeddings().weight is mm.model.get_input_embeddings().weight) == tied


def test_bytes_count_the_copies(arch_paths):
    arch, paths = arch_paths
    mm = ours(arch, paths)
    head = mm.model.get_output_embeddings().base_layer
    lora = sum(rank * sum(mm.layers[m].full_shape) * 4 for m, rank in mm.store.record("head").ranks.items())
    assert mm.store.adapter_bytes("head") == lora + head.weight.numel() * 4
    assert mm.adapters()[0]["modules_to_save"] == ["lm_head"]


def test_inspect_lists_the_copies(arch_paths, capsys):
    from lora_ext.cli import inspect_adapter

    arch, paths = arch_paths
    assert inspect_adapter(paths["head"]) == 0
    assert "modules_to_save copy of lm_head: weight (96, " in capsys.readouterr().out


def test_refused_inputs(tmp_path, arch_paths):
    arch, paths = arch_paths
    plain_model = lora_ext.patch_model(build_model(arch), max_rank=16)  # no modules_to_save
    with pytest.raises(lora_ext.AdapterError, match=r"adapter 'head': .* modules_to_save module 'lm_head': the model "
                                                    r"serves no copies of it"):
        plain_model.load_adapter("head", paths["head"])
    assert plain_model.adapters() == []
    mm = ours(arch, {})
    wide = save_adapter(arch, str(tmp_path / "wide"), model_overrides=dict(vocab_size=100) if arch != "gpt2" else None,
                        r=4, lora_alpha=8, target_modules=[LINEAR[arch]], modules_to_save=["lm_head"]) \
        if arch != "gpt2" else None
    if wide is not None:
        with pytest.raises(lora_ext.AdapterError, match=r"module 'lm_head': weight has shape \(100, 64\), but the "
                                                        r"model's is \(96, 64\)"):
            mm.load_adapter("wide", wide)
    assert mm.adapters() == []
    with pytest.raises(lora_ext.AdapterError, match=r"modules_to_save=\['classifier'\] names no module the model serves"):
        mm.add_adapter("t", dict(r=4, lora_alpha=8, target_modules=[LINEAR[arch]], modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match=r"modules_to_save=\['classifier'\]: no module of .* is named \['classifier'\]"):
        lora_ext.patch_model(build_model(arch), modules_to_save=["classifier"])
    model = build_model(arch)
    with pytest.raises(ValueError, match="both LoRA targets and modules_to_save"):
        lora_ext.patch_model(model, target_modules=[LINEAR[arch]], modules_to_save=[LINEAR[arch]])
    lora_ext.patch_model(model)  # the refused patch left the model as it was


def test_nan_copy_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_adapter("llama", str(tmp_path / "n"), r=4, lora_alpha=8, target_modules=["q_proj"],
                        modules_to_save=["lm_head"])
    tensors = load_file(f"{path}/adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"][0, 0] = float("nan")
    save_file(tensors, f"{path}/adapter_model.safetensors")
    mm = lora_ext.patch_model(build_model("llama"), max_rank=8, modules_to_save=["lm_head"])
    with pytest.raises(lora_ext.AdapterError, match=r"adapter 'n': modules_to_save module 'lm_head': weight holds 1 NaN"):
        mm.load_adapter("n", path)
    assert mm.adapters() == []


def test_training_a_module_copy_matches_peft(tmp_path):
    """A new adapter with an lm_head copy and a loaded one with an embedding copy, trained in one
    mixed batch with a base row: every leaf's gradient (A, B and the copies) equals PEFT's for that
    adapter alone on its rows; the trained adapter saves as a PEFT directory PEFT serves alike."""
    from peft import LoraConfig, get_peft_model

    from lora_ext.losses import per_adapter_loss

    configs = {"head": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
               "embed": dict(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["embed_tokens"])}
    mm = lora_ext.patch_model(build_model("llama"), max_rank=8, modules_to_save=["lm_head", "embed_tokens"])
    mm.add_adapter("head", dict(configs["head"], init_lora_weights=False), generator=torch.Generator().manual_seed(1))
    mm.load_adapter("embed", save_adapter("llama", str(tmp_path / "embed"), seed=2, **configs["embed"]),
                    trainable=True)
    names = ["embed", "head", "__base__", "head"]
    ids = torch.randint(3, 96, (4, 9), generator=torch.Generator().manual_seed(3))
    references = {}
    for name, config in configs.items():
        model = get_peft_model(build_model("llama"), LoraConfig(**config))
        trainable = mm.store.trainable(name)
        with torch.no_grad():
            for module, w in trainable.modules.items():
                layer = model.get_submodule(f"base_model.model.{module}")
                layer.lora_A["default"].weight.copy_(w.lora_a)
                layer.lora_B["default"].weight.copy_(w.lora_b)
            for module, copy in trainable.saved.items():
                model.get_submodule(f"base_model.model.{module}").modules_to_save["default"].weight.copy_(copy["weight"])
        references[name] = model
    mm.train()
    per_adapter_loss(mm(input_ids=ids, adapter_names=names).logits, ids, names)[0].backward()
    for name, model in references.items():
        rows = oracle.rows_of(name, names)
        logits = model(input_ids=ids[rows]).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), ids[rows][:, 1:].reshape(-1)).backward()
        trainable = mm.store.trainable(name)
        pairs = []
        for module, w in trainable.modules.items():
            layer = model.get_submodule(f"base_model.model.{module}")
            pairs += [(w.lora_a, layer.lora_A["default"].weight), (w.lora_b, layer.lora_B["default"].weight)]
        for module, copy in trainable.saved.items():
            pairs.append((copy["weight"], model.get_submodule(f"base_model.model.{module}").modules_to_save["default"].weight))
        assert len(pairs) == 2 * len(trainable.modules) + 1
        for ours, theirs in pairs:
            rel = float((ours.grad - theirs.grad).norm() / theirs.grad.norm())
            assert rel < 1e-5, f"{name}: gradient relative difference {rel:.2e}"
    torch.optim.SGD(mm.adapter_parameters("head"), lr=1.0).step()
    mm.eval()
    mm.save_adapter("head", tmp_path / "saved")
    ids, mask = oracle.batch("cpu", 2, seed=4)
    oracle.assert_matches_peft(mm(input_ids=ids, attention_mask=mask, adapter_names=["head", "head"]).logits, "llama",
                               {"head": str(tmp_path / "saved")}, ids, mask, ["head", "head"], FP32_RTOL)
