"""patch_model against PEFT itself: mixed batches (logits, greedy and beam generation), on tiny
Llama, Mistral, Qwen2 and GPT-2 models, on CPU and (when present) CUDA; plus unpatch, merge and
every refusal of the public API."""

import pytest
import torch

import lora_ext
from tiny_models import ARCHITECTURES, build_model, save_adapter, save_all_adapters

pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402

NAMES = ["sql", "__base__", "chat", "code", "sql", "__base__"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FP32_TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_adapters(request, tmp_path_factory):
    return request.param, save_all_adapters(request.param, tmp_path_factory.mktemp(request.param))


def peft_model(arch, paths, dtype=torch.float32, device="cpu", **kwargs):
    model = PeftModel.from_pretrained(build_model(arch, dtype).to(device), paths["sql"], adapter_name="sql", **kwargs)
    for name in ("chat", "code"):
        model.load_adapter(paths[name], adapter_name=name, **kwargs)
    return model.eval()


def our_model(arch, paths, dtype=torch.float32, device="cpu", **kwargs):
    mm = lora_ext.patch_model(build_model(arch, dtype).to(device), max_adapters=4, max_rank=16, **kwargs)
    for name, path in paths.items():
        mm.load_adapter(name, path)
    return mm


def batch(device, rows=len(NAMES), length=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on two rows
    mask[4, :2] = 0
    ids[mask == 0] = 0
    return ids.to(device), mask.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_logits_match_peft_float32(arch_adapters, device):
    arch, paths = arch_adapters
    ids, mask = batch(device)
    with torch.no_grad():
        expected = peft_model(arch, paths, device=device)(input_ids=ids, attention_mask=mask,
                                                          adapter_names=NAMES).logits
    got = our_model(arch, paths, device=device)(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    torch.testing.assert_close(got, expected, **FP32_TOL)
    base = build_model(arch).to(device)(input_ids=ids, attention_mask=mask).logits
    assert (expected - base).abs().amax() > 0.1, "the adapters must change the output for this test to mean anything"


def test_logits_match_peft_float32_on_the_fused_cpu_path(arch_adapters):
    """6 rows x 5 tokens: few enough rows that Linear layers run base and deltas in one op."""
    arch, paths = arch_adapters
    ids, mask = batch("cpu", length=5)
    with torch.no_grad():
        expected = peft_model(arch, paths)(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    got = our_model(arch, paths)(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    torch.testing.assert_close(got, expected, **FP32_TOL)


def test_hooks_on_a_base_layer_still_run(llama_paths):
    """A hook on the wrapped nn.Linear must see every call, so that layer is not fused."""
    mm = our_model("llama", llama_paths)
    ids, mask = batch("cpu", length=5)
    plain = mm(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    layer = next(m for m in mm.model.modules() if isinstance(m, lora_ext.model.lora_layer.LoraLayer))
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    try:
        hooked = mm(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    finally:
        handle.remove()
    assert seen, "the base layer's forward hook did not run"
    torch.testing.assert_close(hooked, plain, **FP32_TOL)


def test_moving_the_patched_model_keeps_layers_working(llama_paths):
    """.to() replaces the layers' buffers; the layers must use the new ones (they cache their op
    arguments between calls)."""
    ids, mask = batch("cpu", length=5)
    mm = our_model("llama", llama_paths)
    before = mm(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    mm.model.to(torch.float64).to(torch.float32)
    after = mm(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    torch.testing.assert_close(after, before, **FP32_TOL)
    scales = {name: layer.scales.clone() for name, layer in mm.layers.items()}
    mm.model.to(torch.bfloat16)
    assert all(torch.equal(layer.scales, scales[name]) for name, layer in mm.layers.items()), \
        "scales must stay float32 and unrounded"
    bf16 = mm(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - before).abs().amax() < 0.1 * before.abs().amax()


@pytest.mark.parametrize("device", DEVICES)
def test_logits_bfloat16_within_stated_tolerance(arch_adapters, device):
    """bf16 rule: our bf16 error against PEFT in float32 is at most twice the error of PEFT run in
    bf16 with its adapter weights in bf16 too (autocast_adapter_dtype=False), plus 0.02: lora_ext
    keeps adapter weights in the model's dtype, so that is the like-for-like PEFT run."""
    arch, paths = arch_adapters
    ids, mask = batch(device)
    with torch.no_grad():
        truth = peft_model(arch, paths, device=device)(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        peft_bf16 = peft_model(arch, paths, torch.bfloat16, device, autocast_adapter_dtype=False)(
            input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    ours = our_model(arch, paths, torch.bfloat16, device)(input_ids=ids, attention_mask=mask,
                                                          adapter_names=NAMES).logits
    our_err = (ours.float() - truth).abs().amax().item()
    peft_err = (peft_bf16.float() - truth).abs().amax().item()
    assert our_err <= 2 * peft_err + 0.02, f"bf16 error {our_err:.4f} vs PEFT's {peft_err:.4f}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beams,returns", [(1, 1), (3, 1), (3, 2)])
def test_generate_matches_peft(arch_adapters, device, beams, returns):
    arch, paths = arch_adapters
    ids, mask = batch(device, length=7)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=beams,
                  num_return_sequences=returns, pad_token_id=0)
    expected = peft_model(arch, paths, device=device).generate(adapter_names=NAMES, **kwargs)
    got = our_model(arch, paths, device=device).generate(adapter_names=NAMES, **kwargs)
    assert torch.equal(got, expected)


def test_each_row_equals_its_single_adapter_run(arch_adapters):
    arch, paths = arch_adapters
    ids, mask = batch("cpu")
    mm = our_model(arch, paths)
    mixed = mm(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    for row, name in enumerate(NAMES):
        alone = mm(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], adapter_names=[name]).logits
        torch.testing.assert_close(mixed[row:row + 1], alone, **FP32_TOL)


def test_unpatch_restores_bitwise(arch_adapters):
    arch, paths = arch_adapters
    ids, mask = batch("cpu")
    model = build_model(arch)
    before = model(input_ids=ids, attention_mask=mask).logits
    mm = lora_ext.patch_model(model, max_adapters=4, max_rank=16)
    mm.load_adapter("sql", paths["sql"])
    mm(input_ids=ids, attention_mask=mask, adapter_names=["sql"] * len(NAMES))
    restored = mm.unpatch()
    assert restored is model
    assert not any(type(m).__name__ == "LoraLayer" for m in model.modules())
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_merge_matches_adapter_and_unmerge_restores_bitwise(arch_adapters):
    arch, paths = arch_adapters
    ids, mask = batch("cpu")
    mm = our_model(arch, paths)
    weights_before = {k: v.clone() for k, v in mm.model.state_dict().items()}
    with_adapter = mm(input_ids=ids, attention_mask=mask, adapter_names=["chat"] * len(NAMES)).logits
    mm.merge_adapter("chat")
    merged = mm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(merged, with_adapter, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mm(input_ids=ids, attention_mask=mask, adapter_names=["chat"] * len(NAMES)).logits,
                               with_adapter, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"'chat' is merged into the base weights, so rows asking for \['__base__', 'code', 'sql'\]"):
        mm(input_ids=ids, attention_mask=mask, adapter_names=NAMES)
    with pytest.raises(ValueError, match="already merged"):
        mm.merge_adapter("sql")
    mm.unmerge_adapter()
    for key, value in mm.model.state_dict().items():
        assert torch.equal(value, weights_before[key]), f"{key} not restored bitwise"
    torch.testing.assert_close(mm(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits,
                               peft_model(arch, paths)(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits,
                               **FP32_TOL)


# ---- refusals ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_paths(tmp_path_factory):
    return save_all_adapters("llama", tmp_path_factory.mktemp("llama_refusals"))


def test_patching_twice_refused(llama_paths):
    model = build_model("llama")
    lora_ext.patch_model(model)
    with pytest.raises(ValueError, match="already patched"):
        lora_ext.patch_model(model)


def test_unknown_adapter_and_wrong_length_refused(llama_paths):
    mm = our_model("llama", llama_paths)
    ids, mask = batch("cpu")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        mm(input_ids=ids, attention_mask=mask, adapter_names=["nope"] + NAMES[1:])
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 6 rows"):
        mm(input_ids=ids, attention_mask=mask, adapter_names=["sql", "chat"])
    with pytest.raises(ValueError, match="one name per batch row"):
        mm(input_ids=ids, attention_mask=mask, adapter_names="sql")


def test_more_distinct_adapters_than_slots_refused(llama_paths):
    mm = lora_ext.patch_model(build_model("llama"), max_adapters=2, max_rank=16)
    for name, path in llama_paths.items():
        mm.load_adapter(name, path)
    ids, mask = batch("cpu")
    with pytest.raises(ValueError, match="names 3 distinct adapters but there are only 2 device slots"):
        mm(input_ids=ids, attention_mask=mask, adapter_names=NAMES)


def test_rank_above_max_rank_refused(llama_paths):
    mm = lora_ext.patch_model(build_model("llama"), max_adapters=2, max_rank=8)
    with pytest.raises(lora_ext.AdapterError, match=r"adapter 'code': module '.*': rank 16 exceeds max_rank=8"):
        mm.load_adapter("code", llama_paths["code"])
    assert mm.adapters() == []


def test_adapter_for_unpatched_modules_refused(llama_paths):
    mm = lora_ext.patch_model(build_model("llama"), target_modules=["o_proj"], max_rank=16)
    with pytest.raises(lora_ext.AdapterError, match="weights for modules that are not patched"):
        mm.load_adapter("sql", llama_paths["sql"])


def test_unsupported_layer_type_refused():
    with pytest.raises(ValueError, match="'model.norm' is a LlamaRMSNorm; only torch.nn.Linear, transformers Conv1D "
                                         "and torch.nn.Embedding"):
        lora_ext.patch_model(build_model("llama"), target_modules=["norm"])


@pytest.mark.parametrize("feature,config", [
    ("modules_to_save", dict(modules_to_save=["lm_head"])),
    ("trained biases", dict(bias="all")),
])
def test_unsupported_peft_features_refused(tmp_path, feature, config):
    path = save_adapter("llama", str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=["q_proj"], **config)
    mm = lora_ext.patch_model(build_model("llama"), max_rank=16)
    with pytest.raises(lora_ext.AdapterError, match=rf"adapter 'bad'.*{feature}"):
        mm.load_adapter("bad", path)
    assert mm.adapters() == []


def test_use_after_unpatch_refused(llama_paths):
    mm = our_model("llama", llama_paths)
    mm.unpatch()
    with pytest.raises(RuntimeError, match="unpatched"):
        mm.load_adapter("x", llama_paths["sql"])
