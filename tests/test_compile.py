"""torch.compile of a patched model (mm.compile()): one graph for every adapter mix, in training
and in serving (slots reloaded underneath it included), with the eager model's results."""

import pytest
import torch
from torch._dynamo.utils import counters

import lora_ext
from lora_ext.losses import per_adapter_loss
from test_training import ADAPTERS, ROWS, batch, patched
from tiny_models import build_model


def test_compiled_training_step_does_not_recompile_when_the_mix_changes():
    """mm.compile(): one graph for every adapter mix (different adapters, counts, base rows, one
    adapter alone), gradients equal to the eager model's (float32, 1e-5), absent adapters still
    without gradient."""
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = patched(), patched().compile()
    ids = batch()
    mixes = [ROWS, ["sql"] * 6, ["chat", "code", "chat", "code", "__base__", "sql"],
             ["code", "__base__", "__base__", "code", "code", "code"]]
    for names in mixes:
        grads = []
        for mm in (eager, compiled):
            mm.train()
            per_adapter_loss(mm(input_ids=ids, adapter_names=names).logits, ids, names)[0].backward()
            grads.append({n: [p.grad for p in mm.adapter_parameters(n)] for n in ADAPTERS})
            for n in ADAPTERS:
                for p in mm.adapter_parameters(n):
                    p.grad = None
        for name in ADAPTERS:
            for g_eager, g_compiled in zip(grads[0][name], grads[1][name]):
                assert (g_compiled is None) == (name not in names), f"{name} in {names}: gradient presence"
                if g_eager is not None:
                    rel = float((g_compiled - g_eager).norm() / g_eager.norm())
                    assert rel < 1e-5, f"{name} in {names}: relative difference {rel:.2e}"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])



def test_compiled_serving_does_not_recompile_when_the_mix_changes():
    """Three adapters through two slots (each mix evicts and reloads one): logits equal the eager
    model's (float32, 1e-5 of their norm) with one graph for every mix, and one more for a batch
    of base rows only (its layers skip the ops)."""
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = patched(max_adapters=2), patched(max_adapters=2).compile()
    ids = batch(rows=4)
    mixes = [["sql", "chat", "sql", "__base__"], ["code", "code", "sql", "sql"], ["chat", "__base__", "code", "chat"],
             ["code", "code", "code", "code"], ["sql", "chat", "chat", "__base__"]]
    with torch.no_grad():
        for names in mixes:
            want = eager(input_ids=ids, adapter_names=names).logits
            got = compiled(input_ids=ids, adapter_names=names).logits
            rel = float((got - want).norm() / want.norm())
            assert rel < 1e-5, f"{names}: relative difference {rel:.2e}"
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        base = ["__base__"] * 4
        torch.testing.assert_close(compiled(input_ids=ids, adapter_names=base).logits, eager.model(input_ids=ids).logits)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_compiled_training_with_a_dropout_adapter_keeps_one_graph():
    """Mixes with and without the adapter that has dropout take the same path once compiled."""
    torch._dynamo.reset()
    counters.clear()
    adapters = {**ADAPTERS, "drop": dict(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.3,
                                         init_lora_weights=False)}
    mm = patched(adapters=adapters).compile()
    mm.train()
    ids = batch()
    for names in (ROWS, ["drop", "sql", "drop", "chat", "__base__", "sql"], ["code"] * 6):
        per_adapter_loss(mm(input_ids=ids, adapter_names=names).logits, ids, names)[0].backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert all(p.grad is not None for p in mm.adapter_parameters("drop"))


def test_compiled_generate_gives_eager_tokens_without_recompiling_per_mix():
    """Greedy decoding with a KV cache: the first mix compiles its graphs (prefill, then decode
    with a growing cache); later mixes, with evictions through two slots, add none."""
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = patched(max_adapters=2), patched(max_adapters=2).compile()
    ids = batch(rows=4)
    mixes = [["sql", "chat", "sql", "__base__"], ["code", "code", "sql", "sql"], ["chat", "__base__", "code", "chat"]]
    graphs = None
    for names in mixes:
        want = eager.generate(input_ids=ids, adapter_names=names, max_new_tokens=6, do_sample=False)
        got = compiled.generate(input_ids=ids, adapter_names=names, max_new_tokens=6, do_sample=False)
        assert torch.equal(got, want), names
        graphs = graphs or counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])


@pytest.mark.cuda
def test_cuda_graphs_replay_a_decode_step_with_new_adapter_names():
    """mm.compile(mode="reduce-overhead") captures the patched model's forward in CUDA graphs
    (inductor's CUDA graph trees): the batch's row slots are a graph input copied into its static
    buffer at each replay, the adapters' weights live in the slot buffers the graph reads, so new
    adapter names (and slot reloads between replays) need neither a new graph nor a recapture.
    Written without a GPU: it runs when one is lent (benchmarks/gpu_check.sh)."""
    torch._dynamo.reset()
    counters.clear()

    def on_cuda():
        mm = lora_ext.patch_model(build_model("llama").cuda(), max_adapters=2, max_rank=16)
        g = torch.Generator().manual_seed(3)
        for name, config in ADAPTERS.items():
            mm.add_adapter(name, config, generator=g)
        return mm.eval()
    eager, compiled = on_cuda(), on_cuda().compile(mode="reduce-overhead")
    ids = batch(rows=4).cuda()
    mixes = [["sql", "chat", "sql", "__base__"], ["code", "code", "sql", "sql"], ["chat", "__base__", "code", "chat"],
             ["sql", "chat", "chat", "__base__"]] * 2
    with torch.no_grad():
        for names in mixes:
            want = eager(input_ids=ids, adapter_names=names).logits
            got = compiled(input_ids=ids, adapter_names=names).logits.clone()
            rel = float((got - want).norm() / want.norm())
            assert rel < 1e-5, f"{names}: relative difference {rel:.2e}"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert counters["inductor"].get("cudagraph_skips", 0) == 0, dict(counters["inductor"])


def test_compiled_training_batch_with_more_adapters_than_slots_is_refused():
    """A compiled model's batch stacks max_adapters entries: a training batch naming more adapters
    is refused with a clear error before the model runs (eagerly it would train)."""
    mm = patched(max_adapters=2).compile()
    mm.train()
    ids = batch(rows=3)
    with pytest.raises(ValueError, match=r"at most max_adapters=2 adapters, this one has 3"):
        mm(input_ids=ids, adapter_names=["sql", "chat", "code"])
