"""Every kind of adapter lora_ext serves in one unsorted batch with base rows: DoRA, a lora_B bias
(where the base layers have a bias), an embedding adapter, an lm_head copy (modules_to_save) and
plain LoRA, on tiny Llama, Qwen2 and GPT-2, against PEFT in float64 adapter by adapter."""

import pytest
import torch

import lora_ext
import peft_oracle as oracle
from tiny_models import build_model, save_adapter

pytest.importorskip("peft")

FP32_RTOL = 1e-5  # float32 logits against PEFT in float64, relative to the largest logit of the rows compared
EMBEDDING = {"llama": "embed_tokens", "qwen2": "embed_tokens", "gpt2": "wte"}
LINEAR = {"llama": ["q_proj", "down_proj"], "qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_fc"]}


def configs(arch):
    kinds = dict(dora=dict(r=8, lora_alpha=16, use_dora=True, target_modules=LINEAR[arch]),
                 emb=dict(r=4, lora_alpha=8, target_modules=[LINEAR[arch][0], EMBEDDING[arch]]),
                 head=dict(r=4, lora_alpha=8, target_modules=LINEAR[arch][1:], modules_to_save=["lm_head"]),
                 # rank 16, scale 1: with rsLoRA's scale 2 on top of the widened B (tiny_models), GPT-2's one
                 # plain row amplified float32 rounding to 3.5e-5 of its logits (every patched layer within
                 # 1.6e-7 of float64; PEFT's float32 happened to land at 4.5e-6): a coin toss, not a check
                 plain=dict(r=16, lora_alpha=16, target_modules=LINEAR[arch]))
    if arch != "llama":  # Llama's linear layers have no bias for a lora_B bias to go with
        kinds["biased"] = dict(r=4, lora_alpha=8, lora_bias=True, target_modules=LINEAR[arch][:1])
    return kinds


@pytest.mark.parametrize("arch", list(EMBEDDING))
def test_every_kind_in_one_batch(arch, tmp_path):
    paths = {name: save_adapter(arch, str(tmp_path / name), seed=90 + i, **config)
             for i, (name, config) in enumerate(configs(arch).items())}
    kinds = list(paths)
    names = [kinds[i % len(kinds)] if i % 3 else "__base__" for i in (5, 2, 0, 7, 1, 4, 3, 8, 6, 10, 11, 9)]
    mm = lora_ext.patch_model(build_model(arch), target_modules=["all-linear", EMBEDDING[arch]],
                              modules_to_save=["lm_head"], max_adapters=len(kinds), max_rank=16)
    for name, path in paths.items():
        mm.load_adapter(name, path)
    ids, mask = oracle.batch("cpu", len(names))
    got = mm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    oracle.assert_matches_peft(got, arch, paths, ids, mask, names, FP32_RTOL)
    tokens = mm.generate(input_ids=ids, attention_mask=mask, adapter_names=names, do_sample=False, max_new_tokens=5)
    for name, expected in oracle.expected_generation(arch, paths, ids, mask, names, max_new_tokens=5).items():
        assert torch.equal(tokens[oracle.rows_of(name, names)], expected), name
