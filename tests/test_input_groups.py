"""Layers that read one input, served in one call (lora_ext/model/input_groups.py): the groups a
model's forward shows (q/k/v, gate/up; never o_proj or down_proj), outputs bit for bit those of
the same model with share_inputs=False (logits and generation, float32 and bfloat16), and every
case that must fall back to layer-by-layer serving: a member reading another input, a hook on a
member, training. PEFT agreement of the grouped path is checked by test_model_patching.py
(share_inputs is on by default)."""

import logging

import pytest
import torch

import lora_ext
from lora_ext import kernel_config, ops
from test_adapter_memory import write_adapter
from tiny_models import build_model, save_all_adapters

NAMES = ["sql", "__base__", "chat", "code", "sql", "chat"]
LLAMA_LIKE = ["llama", "mistral", "qwen2"]


@pytest.fixture(scope="module", params=LLAMA_LIKE + ["gpt2"])
def arch_adapters(request, tmp_path_factory):
    return request.param, save_all_adapters(request.param, tmp_path_factory.mktemp(request.param))


def patched(arch, paths, dtype=torch.float32, **kwargs):
    mm = lora_ext.patch_model(build_model(arch, dtype), max_adapters=4, max_rank=16, **kwargs)
    for name, path in paths.items():
        mm.load_adapter(name, path)
    return mm


def ids(rows=len(NAMES), length=9, seed=0):
    return torch.randint(3, 96, (rows, length), generator=torch.Generator().manual_seed(seed))


class GroupCalls:
    """Counts linear_lora_group calls (the op stays the real one)."""

    def __init__(self, monkeypatch):
        self.count = 0
        real = ops.linear_lora_group

        def counting(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(ops, "linear_lora_group", counting)


def member_names(mm):
    return sorted(tuple(m.module_name.rsplit(".", 1)[1] for m in g.members) for g in mm.input_groups if g.members)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_groups_serve_the_same_bits_as_layer_by_layer(arch_adapters, dtype, monkeypatch):
    arch, paths = arch_adapters
    grouped, alone = patched(arch, paths, dtype), patched(arch, paths, dtype, share_inputs=False)
    calls = GroupCalls(monkeypatch)
    tokens = ids()
    for step in range(3):  # the first forward pass shows the groups, the next ones use them
        got = grouped(input_ids=tokens, adapter_names=NAMES).logits
        assert torch.equal(got, alone(input_ids=tokens, adapter_names=NAMES).logits), f"forward {step}"
    generated = [mm.generate(input_ids=tokens, adapter_names=NAMES, max_new_tokens=4, do_sample=False)
                 for mm in (grouped, alone)]
    assert torch.equal(*generated)
    if arch == "gpt2":  # c_attn is one layer already; c_fc and c_proj read different inputs
        assert grouped.input_groups == [] and calls.count == 0
        return
    layers = build_model(arch).config.num_hidden_layers
    assert member_names(grouped) == [("gate_proj", "up_proj")] * layers + [("q_proj", "k_proj", "v_proj")] * layers
    assert all(g.enabled for g in grouped.input_groups)
    # forwards 2 and 3 and every generation step: one call per group
    assert calls.count == 2 * layers * (2 + 4), calls.count


def test_fewer_op_calls_per_forward(arch_adapters):
    arch, paths = arch_adapters
    if arch == "gpt2":
        pytest.skip("no groups in GPT-2")
    counts = []
    for share in (True, False):
        mm = patched(arch, paths, share_inputs=share)
        mm(input_ids=ids(), adapter_names=NAMES)
        with kernel_config.paths_taken() as taken:
            mm(input_ids=ids(), adapter_names=NAMES)
        counts.append(taken.get("cpu_linear_fused", 0) + taken.get("cpu_linear_unfused", 0))
    layers = build_model(arch).config.num_hidden_layers
    assert counts == [4 * layers, 7 * layers], counts  # q/k/v + o + gate/up + down, against 7 layers


class TwoInputs(torch.nn.Module):
    """q, k and v read x, unless k is told to read `other` (cross-attention-like)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(24, n) for n in (16, 8, 8))

    def forward(self, x, other=None):
        return torch.cat([self.q(x), self.k(x if other is None else other), self.v(x)], dim=-1)


@pytest.fixture(scope="module")
def two_input_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_inputs")
    tensors = {}
    g = torch.Generator().manual_seed(3)
    for module, d_out in (("q", 16), ("k", 8), ("v", 8)):
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(4, 24, generator=g)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(d_out, 4, generator=g)
    return write_adapter(root / "a", 0, modules=("q", "k", "v"), tensors=tensors)


def test_a_member_reading_another_input_turns_its_group_off(two_input_adapters, caplog):
    grouped = lora_ext.patch_model(TwoInputs(), max_adapters=2, max_rank=8)
    alone = lora_ext.patch_model(TwoInputs(), max_adapters=2, max_rank=8, share_inputs=False)
    for mm in (grouped, alone):
        mm.load_adapter("a", two_input_adapters)
    x, other = torch.randn(3, 24), torch.randn(3, 24)
    names = ["a", "__base__", "a"]
    for _ in range(2):
        assert torch.equal(grouped(x, adapter_names=names), alone(x, adapter_names=names))
    (group,) = grouped.input_groups
    assert [m.module_name for m in group.members] == ["q", "k", "v"] and group.enabled
    with caplog.at_level(logging.WARNING, logger="lora_ext"):
        got = grouped(x, other, adapter_names=names)
    assert torch.equal(got, alone(x, other, adapter_names=names))
    assert not group.enabled and "layer k was called with another input than its siblings" in caplog.text
    assert torch.equal(grouped(x, adapter_names=names), alone(x, adapter_names=names))


def test_learning_ignores_layers_that_read_other_inputs(two_input_adapters):
    """k reading `other` from the first call on: the group is what was seen sharing (q and v)."""
    grouped = lora_ext.patch_model(TwoInputs(), max_adapters=2, max_rank=8)
    alone = lora_ext.patch_model(TwoInputs(), max_adapters=2, max_rank=8, share_inputs=False)
    for mm in (grouped, alone):
        mm.load_adapter("a", two_input_adapters)
    x, other = torch.randn(3, 24), torch.randn(3, 24)
    for _ in range(3):
        assert torch.equal(grouped(x, other, adapter_names=["a"] * 3), alone(x, other, adapter_names=["a"] * 3))
    (group,) = grouped.input_groups
    assert [m.module_name for m in group.members] == ["q", "v"] and group.enabled


def test_a_hook_on_a_member_runs_and_the_group_steps_aside(monkeypatch):
    paths = save_all_adapters("llama", __import__("pathlib").Path(__import__("tempfile").mkdtemp()))
    grouped, alone = patched("llama", paths), patched("llama", paths, share_inputs=False)
    tokens = ids(length=5)
    grouped(input_ids=tokens, adapter_names=NAMES)
    k_proj = grouped.model.model.layers[0].self_attn.k_proj
    seen = []
    handle = k_proj.base_layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    calls = GroupCalls(monkeypatch)
    try:
        got = grouped(input_ids=tokens, adapter_names=NAMES).logits
    finally:
        handle.remove()
    assert seen, "the hook on k_proj's base layer did not run"
    # the hooked layer adds its delta to ATen's linear, not the fused kernel's: float32 rounding
    torch.testing.assert_close(got, alone(input_ids=tokens, adapter_names=NAMES).logits, rtol=1e-5, atol=1e-5)
    layers = build_model("llama").config.num_hidden_layers
    assert calls.count == 2 * layers - 1  # every group but layer 0's attention


def test_training_runs_layer_by_layer(monkeypatch, tmp_path):
    paths = save_all_adapters("llama", tmp_path)
    mm = lora_ext.patch_model(build_model("llama"), max_adapters=4, max_rank=16)
    mm.load_adapter("sql", paths["sql"], trainable=True)
    calls = GroupCalls(monkeypatch)
    mm.train()
    for _ in range(2):
        out = mm(input_ids=ids(rows=2), adapter_names=["sql", "__base__"]).logits
        out.float().pow(2).mean().backward()
    assert calls.count == 0
    assert all(p.grad is not None for p in mm.adapter_parameters("sql"))
