"""PEFT as the oracle for features it cannot mix in one batch (DoRA, embedding adapters run
adapter by adapter): each row's expected logits come from PEFT with that row's adapter alone."""

import torch

import lora_ext
from tiny_models import build_model, save_adapter

# each architecture's embedding (GPT-2's is tied to lm_head) and a linear layer to put LoRA on
EMBEDDING = {"llama": "embed_tokens", "qwen2": "embed_tokens", "gpt2": "wte"}
LINEAR = {"llama": "q_proj", "qwen2": "v_proj", "gpt2": "c_attn"}


def save_adapters(arch, root, configs, seed):
    """{name: directory} of PEFT adapters saved from {name: LoraConfig fields}."""
    return {name: save_adapter(arch, str(root / name), seed=seed + i, **config)
            for i, (name, config) in enumerate(configs.items())}


def patched(arch, paths, device="cpu", max_adapters=4, **patch_kwargs):
    """A tiny `arch` model patched by lora_ext (max_rank 16) with the adapters loaded."""
    mm = lora_ext.patch_model(build_model(arch).to(device), max_adapters=max_adapters, max_rank=16, **patch_kwargs)
    for name, path in paths.items():
        mm.load_adapter(name, path)
    return mm


def batch(device, rows, length=10, seed=0):
    """Token ids and a mask with left padding on a row or two."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1 % rows, :3] = 0
    mask[min(5, rows - 1), :2] = 0
    ids[mask == 0] = 0
    return ids.to(device), mask.to(device)


def peft_alone(arch, path, dtype=torch.float32, device="cpu"):
    """PEFT with this one adapter (its rows are run without the others)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(build_model(arch, dtype).to(device), path).eval()


def rows_of(name, names):
    return [i for i, n in enumerate(names) if n == name]


def expected_logits(arch, paths, ids, mask, names, dtype=torch.float64, device="cpu"):
    """Each row's logits as PEFT gives them with the row's adapter alone (the base model for base
    rows), by default in float64: the float32 answer's own error (measured up to 1.1e-5 of the
    largest logit on these models) would otherwise count against lora_ext."""
    out = None
    with torch.no_grad():
        for name in dict.fromkeys(names):
            model = build_model(arch, dtype).to(device) if name == "__base__" else peft_alone(arch, paths[name], dtype,
                                                                                               device)
            rows = rows_of(name, names)
            logits = model(input_ids=ids[rows], attention_mask=mask[rows]).logits
            if out is None:
                out = torch.empty((len(names),) + logits.shape[1:], dtype=logits.dtype, device=device)
            out[rows] = logits
    return out


def expected_generation(arch, paths, ids, mask, names, **generation):
    """Each row's generated tokens from PEFT with the row's adapter alone (rows of one adapter together)."""
    out = {}
    for name in dict.fromkeys(names):
        rows = rows_of(name, names)
        model = build_model(arch) if name == "__base__" else peft_alone(arch, paths[name])
        with torch.no_grad():
            out[name] = model.generate(input_ids=ids[rows], attention_mask=mask[rows], do_sample=False, **generation)
    return out


def relative_error(got, expected):
    """max |got - expected| over the largest |expected|."""
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def assert_matches_peft(got, arch, paths, ids, mask, names, rtol, device="cpu"):
    """Each adapter's rows of `got` (float32) against PEFT in float64: within `rtol` of the
    largest logit, or twice PEFT's own float32 error on those rows where that is larger (the
    project's rule: twice what the same math costs in the dtype; on tiny GPT-2, PEFT's float32
    logits are up to 3e-5 off)."""
    truth = expected_logits(arch, paths, ids, mask, names, device=device)
    peft32 = expected_logits(arch, paths, ids, mask, names, dtype=torch.float32, device=device)
    for name in dict.fromkeys(names):
        rows = rows_of(name, names)
        bound = max(rtol, 2 * relative_error(peft32[rows], truth[rows]))
        error = relative_error(got[rows], truth[rows])
        assert error <= bound, f"rows of {name!r}: relative error {error:.3g} > {bound:.3g}"
