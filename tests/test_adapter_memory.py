"""The adapter memory manager: refusals that leave every tier as it was, host cache and device
slot eviction, prefetch, concurrent load/unload while batches run, soak, hostile files."""

import json
import logging
import os
import random
import threading

import pytest
import torch
from safetensors.torch import save_file

import lora_ext
from lora_ext.cli import main as cli_main

D_IN, D_HID, D_OUT = 24, 40, 16


class TinyNet(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(D_IN, D_HID)
        self.fc2 = torch.nn.Linear(D_HID, D_OUT)
        self.to(dtype)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def write_adapter(path, seed, rank=4, alpha=8.0, modules=("fc1", "fc2"), config=None, tensors=None):
    """A PEFT-format adapter directory with random weights; returns its path."""
    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sizes = {"fc1": (D_IN, D_HID), "fc2": (D_HID, D_OUT)}
    if tensors is None:
        tensors = {}
        for m in modules:
            d_in, d_out = sizes[m]
            tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, d_in, generator=g)
            tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(d_out, rank, generator=g)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    cfg = dict(peft_type="LORA", r=rank, lora_alpha=alpha, target_modules=list(modules))
    cfg.update(config or {})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return str(path)


_PEFT_LORA = {}


def peft_lora(path):
    """Each module's (lora_A, lora_B, scaling) as PEFT itself loads the adapter at `path`: the
    oracle is PEFT, not lora_ext.read_peft_adapter (the code under test)."""
    if path not in _PEFT_LORA:
        peft = pytest.importorskip("peft")
        with torch.random.fork_rng():  # TinyNet() seeds the global generator
            model = peft.PeftModel.from_pretrained(TinyNet(), path).base_model.model
        _PEFT_LORA[path] = {m: (layer.lora_A["default"].weight.detach().double(),
                                layer.lora_B["default"].weight.detach().double(), layer.scaling["default"])
                            for m in ("fc1", "fc2") if hasattr(layer := getattr(model, m), "lora_A")}
    return _PEFT_LORA[path]


def reference(x, names, paths, base=None):
    """Each row computed alone: base layers plus that row's adapter (weights and scaling as PEFT
    loads them), in float64."""
    base = base or TinyNet()
    out = []
    for row, name in zip(x, names):
        w = peft_lora(paths[name]) if name not in (None, "__base__") else {}

        def layer(m, h):
            lin = getattr(base, m)
            y = h @ lin.weight.double().T + lin.bias.double()
            if m in w:
                a, b, s = w[m]
                y = y + s * (h @ a.T) @ b.T
            return y

        out.append(layer("fc2", torch.relu(layer("fc1", row.double()))))
    return torch.stack(out)


def assert_matches_reference(out, x, names, paths):
    """A float32 result against the float64 per-row reference."""
    torch.testing.assert_close(out.double(), reference(x, names, paths), rtol=1e-4, atol=1e-4)


def snapshot(mm):
    return mm.adapters(), {k: v for k, v in mm.stats().items() if k != "load_seconds"}


@pytest.fixture
def adapters(tmp_path):
    return {f"a{i}": write_adapter(tmp_path / f"a{i}", seed=i, rank=1 + i % 6) for i in range(6)}


# ---- refusals: each names the problem and leaves every tier and every output as it was ------------

def refusal_cases(tmp_path):
    ok = dict(seed=99)
    cases = {}

    def case(name, pattern, make):
        cases[name] = (pattern, make)

    case("missing directory", r"is not a directory", lambda p: str(p / "nowhere"))
    case("missing config", r"adapter_config.json is missing",
         lambda p: (write_adapter(p, **ok), os.remove(p / "adapter_config.json"), str(p))[-1])
    case("config not JSON", r"cannot be read as JSON",
         lambda p: (write_adapter(p, **ok), (p / "adapter_config.json").write_text("{oops"), str(p))[-1])
    case("config without r", r"field 'r' must be a positive number, not None",
         lambda p: write_adapter(p, **ok, config=dict(r=None)))
    case("missing weights", r"has neither adapter_model.safetensors nor adapter_model.bin",
         lambda p: (write_adapter(p, **ok), os.remove(p / "adapter_model.safetensors"), str(p))[-1])
    case("corrupt safetensors", r"adapter_model.safetensors is corrupt or truncated",
         lambda p: (write_adapter(p, **ok), (p / "adapter_model.safetensors").write_bytes(os.urandom(200)), str(p))[-1])
    case("truncated safetensors", r"adapter_model.safetensors is corrupt or truncated",
         lambda p: (write_adapter(p, **ok), _truncate(p / "adapter_model.safetensors"), str(p))[-1])
    case("pickle without opt-in", r"holds only adapter_model.bin, a pickle",
         lambda p: _pickle_adapter(p))
    case("key of no patched module", r"weights for modules that are not patched: \['fc3'\] \(1 of 2\)",
         lambda p: write_adapter(p, **ok, tensors=_tensors(("fc1", "fc3"))))
    case("matches no module at all", r"not patched: \['other.x', 'other.y'\] \(2 of 2\)",
         lambda p: write_adapter(p, **ok, tensors=_tensors(("other.x", "other.y"))))
    case("lora_A without lora_B", r"module 'fc2' has lora_A but no lora_B",
         lambda p: write_adapter(p, **ok, tensors={k: v for k, v in _tensors(("fc1", "fc2")).items()
                                                   if "fc2.lora_B" not in k}))
    case("shape disagrees with module", r"module 'fc1': lora_A \(4, 23\) and lora_B \(40, 4\) do not fit the layer \(24 -> 40\)",
         lambda p: write_adapter(p, **ok, tensors=_tensors(("fc1",), d_in=23)))
    case("shapes disagree with each other", r"module 'fc1': lora_A has rank 4 .* but lora_B has rank 3",
         lambda p: write_adapter(p, **ok, tensors=_tensors(("fc1",), rank_b=3)))
    case("rank disagrees with config", r"weights have rank 4 but the config gives rank 2",
         lambda p: write_adapter(p, **ok, config=dict(r=2)))
    case("rank above max_rank", r"rank 9 exceeds max_rank=8", lambda p: write_adapter(p, seed=1, rank=9))
    case("NaN weights", r"module 'fc2': lora_B holds 1 NaN or infinite values",
         lambda p: write_adapter(p, **ok, tensors=_tensors(("fc2",), poison=float("nan"))))
    case("infinite weights", r"lora_B holds 1 NaN or infinite values",
         lambda p: write_adapter(p, **ok, tensors=_tensors(("fc2",), poison=float("inf"))))
    case("DoRA without magnitudes", r"module 'fc\d' has no lora_magnitude_vector but the config has use_dora=true",
         lambda p: write_adapter(p, **ok, config=dict(use_dora=True)))
    case("DoRA with lora_bias", r"use_dora=true with lora_bias=true",
         lambda p: write_adapter(p, **ok, config=dict(use_dora=True, lora_bias=True)))
    case("modules_to_save copy the model does not serve", r"modules_to_save module 'head': the model serves no copies",
         lambda p: write_adapter(p, **ok, config=dict(modules_to_save=["head"]), tensors={
             **_tensors(("fc1",)), "base_model.model.head.weight": torch.ones(3, 4)}))
    case("trained bias", r"bias='lora_only'", lambda p: write_adapter(p, **ok, config=dict(bias="lora_only")))
    case("not LoRA", r"peft_type 'IA3'", lambda p: write_adapter(p, **ok, config=dict(peft_type="IA3")))
    case("DoRA weights without use_dora", r"module 'fc1' has a lora_magnitude_vector .* but the config has use_dora=false",
         lambda p: write_adapter(p, **ok, tensors={**_tensors(("fc1",)),
                                                   "base_model.model.fc1.lora_magnitude_vector": torch.ones(40)}))
    case("magnitude of the wrong length", r"module 'fc1': lora_magnitude_vector has shape \(39,\), not \(40,\)",
         lambda p: write_adapter(p, **ok, config=dict(use_dora=True), tensors={
             **_tensors(("fc1",)), "base_model.model.fc1.lora_magnitude_vector": torch.ones(39)}))
    case("NaN magnitude", r"module 'fc1': lora_magnitude_vector holds 1 NaN or infinite values",
         lambda p: write_adapter(p, **ok, config=dict(use_dora=True), tensors={
             **_tensors(("fc1",)), "base_model.model.fc1.lora_magnitude_vector": torch.tensor([float("nan")] + [1.0] * 39)}))
    case("bias of the wrong size", r"module 'fc1': lora_B bias has shape \(41,\), not \(40,\)",
         lambda p: write_adapter(p, **ok, config=dict(lora_bias=True), tensors={
             **_tensors(("fc1",)), "base_model.model.fc1.lora_B.bias": torch.ones(41)}))
    case("bias without lora_bias", r"module 'fc1' has a lora_B bias .* but the config has lora_bias=false",
         lambda p: write_adapter(p, **ok, tensors={**_tensors(("fc1",)), "base_model.model.fc1.lora_B.bias": torch.ones(40)}))
    return cases


def _tensors(modules, rank=4, d_in=None, rank_b=None, poison=None):
    sizes = {"fc1": (D_IN, D_HID), "fc2": (D_HID, D_OUT)}
    out = {}
    for m in modules:
        i, o = sizes.get(m, (D_IN, D_HID))
        out[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, d_in or i)
        b = torch.randn(o, rank_b or rank)
        if poison is not None:
            b[0, 0] = poison
        out[f"base_model.model.{m}.lora_B.weight"] = b
    return out


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _pickle_adapter(path):
    write_adapter(path, seed=3)
    torch.save(_tensors(("fc1",)), path / "adapter_model.bin")
    os.remove(path / "adapter_model.safetensors")
    return str(path)


@pytest.mark.parametrize("case", list(refusal_cases(None)))
def test_refusal_names_problem_and_changes_nothing(tmp_path, adapters, case):
    pattern, make = refusal_cases(tmp_path)[case]
    bad = make(tmp_path / "bad")
    mm = lora_ext.patch_model(TinyNet(), max_adapters=3, max_rank=8)
    for name in ("a1", "a2"):
        mm.load_adapter(name, adapters[name])
    x = torch.randn(4, D_IN)
    names = ["a1", "a2", "__base__", "a1"]
    before_out = mm(x, adapter_names=names)
    before = snapshot(mm)
    with pytest.raises(ValueError, match=pattern) as info:
        mm.load_adapter("bad", bad)
    if case not in ("missing directory",):
        assert "'bad'" in str(info.value), "the error names the adapter"
    assert snapshot(mm) == before
    assert torch.equal(mm(x, adapter_names=names), before_out)


def test_pickle_loads_only_when_allowed(tmp_path):
    path = _pickle_adapter(tmp_path / "p")
    mm = lora_ext.patch_model(TinyNet(), max_adapters=2, max_rank=8)
    mm.load_adapter("p", path, allow_pickle=True)
    assert mm.adapters()[0]["name"] == "p"


class _Payload:
    """Unpickling this runs code: it creates the file named by `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_never_runs(tmp_path):
    path = tmp_path / "evil"
    write_adapter(path, seed=1)
    os.remove(path / "adapter_model.safetensors")
    marker = tmp_path / "pwned"
    torch.save({"base_model.model.fc1.lora_A.weight": _Payload(str(marker))}, path / "adapter_model.bin")
    mm = lora_ext.patch_model(TinyNet(), max_adapters=2, max_rank=8)
    with pytest.raises(lora_ext.AdapterError, match="a pickle"):
        mm.load_adapter("evil", str(path))
    with pytest.raises(lora_ext.AdapterError, match="cannot be loaded with weights_only=True"):
        mm.load_adapter("evil", str(path), allow_pickle=True)
    assert not marker.exists(), "the pickle payload ran"
    assert cli_main(["inspect", str(path), "--allow-pickle"]) == 1
    assert not marker.exists()


def test_overflow_after_cast_refused(tmp_path):
    tensors = _tensors(("fc1",))
    tensors["base_model.model.fc1.lora_A.weight"][0, 0] = 1e6  # finite in float32, inf in float16
    path = write_adapter(tmp_path / "big", seed=1, tensors=tensors)
    mm = lora_ext.patch_model(TinyNet(torch.float16), max_adapters=2, max_rank=8)
    with pytest.raises(lora_ext.AdapterError, match=r"module 'fc1': weights overflow to infinity when cast to torch.float16"):
        mm.load_adapter("big", path)
    assert mm.adapters() == []


def test_batch_errors_raise_before_any_computation(adapters):
    mm = lora_ext.patch_model(TinyNet(), max_adapters=2, max_rank=8)
    for name in ("a0", "a1", "a2"):
        mm.load_adapter(name, adapters[name])
    calls = []
    mm.model.fc1.register_forward_hook(lambda *args: calls.append(1))
    before = snapshot(mm)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]"):
        mm(torch.randn(2, D_IN), adapter_names=["a0", "zz"])
    with pytest.raises(ValueError, match="names 3 distinct adapters but there are only 2 device slots"):
        mm(torch.randn(3, D_IN), adapter_names=["a0", "a1", "a2"])
    assert calls == [] and snapshot(mm) == before


# ---- tiers ----------------------------------------------------------------------------------------

def test_slots_and_host_cache_evict_least_recently_used(adapters, caplog):
    one = lora_ext.read_peft_adapter("a5", adapters["a5"]).nbytes
    mm = lora_ext.patch_model(TinyNet(), max_adapters=2, max_rank=8, host_cache_bytes=3 * one)
    caplog.set_level(logging.INFO, logger="lora_ext")
    for name, path in adapters.items():
        mm.load_adapter(name, path)
    stats = mm.stats()
    assert stats["registered"] == 6 and stats["resident"] == 2 and stats["cached"] < 6
    assert stats["host_cache_bytes"] <= 3 * one and stats["host_evictions"] > 0
    x = torch.randn(3, D_IN)
    for names in (["a0", "a5", "a0"], ["a3", "__base__", "a4"], ["a1", "a1", "a2"]):
        assert_matches_reference(mm(x, adapter_names=names), x, names, adapters)
    stats = mm.stats()
    assert stats["slot_evictions"] > 0 and stats["disk_reads"] > 0 and stats["misses"] > 0
    assert any("evicted adapter" in r.message for r in caplog.records)
    assert any("loaded adapter" in r.message for r in caplog.records)


def test_prefetch_makes_adapters_resident(adapters):
    mm = lora_ext.patch_model(TinyNet(), max_adapters=2, max_rank=8)
    for name, path in adapters.items():
        mm.load_adapter(name, path)
    mm.prefetch(["a4", "a5"])
    assert {a["name"] for a in mm.adapters() if a["slot"] is not None} == {"a4", "a5"}
    hits = mm.stats()["hits"]
    mm(torch.randn(2, D_IN), adapter_names=["a4", "a5"])
    assert mm.stats()["hits"] == hits + 2


def test_prefetch_refuses_unknown_names(adapters):
    mm = lora_ext.patch_model(TinyNet(), max_adapters=2, max_rank=8)
    mm.load_adapter("a0", adapters["a0"])
    before = snapshot(mm)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]; loaded: \['a0'\]"):
        mm.prefetch(["a0", "zz"])
    assert snapshot(mm) == before


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(max_adapters=0), "max_adapters must be a positive integer, not 0"),
    (dict(max_rank=2.5), "max_rank must be a positive integer, not 2.5"),
    (dict(target_modules=[]), "target_modules must be 'all-linear'"),
    (dict(target_modules=["nothing_here"]), r"target_modules=\['nothing_here'\] matches no module of TinyNet"),
])
def test_patch_model_refuses_bad_arguments(kwargs, pattern):
    model = TinyNet()
    with pytest.raises(ValueError, match=pattern):
        lora_ext.patch_model(model, **kwargs)
    assert not any(type(m).__name__ == "LoraLayer" for m in model.modules())


def test_unload_frees_everything_and_refuses_unknown(adapters):
    mm = lora_ext.patch_model(TinyNet(), max_adapters=2, max_rank=8)
    mm.load_adapter("a0", adapters["a0"])
    mm.unload_adapter("a0")
    assert mm.adapters() == [] and mm.stats()["host_cache_bytes"] == 0 and mm.stats()["resident"] == 0
    with pytest.raises(ValueError, match="unknown adapter 'a0'"):
        mm.unload_adapter("a0")
    mm.load_adapter("a1", adapters["a1"])
    with pytest.raises(ValueError, match="already loaded"):
        mm.load_adapter("a1", adapters["a1"])


def test_eviction_never_touches_a_slot_a_running_batch_uses(adapters):
    mm = lora_ext.patch_model(TinyNet(), max_adapters=2, max_rank=8, slot_timeout=0.3)
    for name, path in adapters.items():
        mm.load_adapter(name, path)
    inside, release = threading.Event(), threading.Event()

    def pause(module, inputs, output):
        if threading.current_thread().name == "slow-batch":
            inside.set()
            release.wait(10)

    mm.model.fc2.register_forward_hook(pause)
    x = torch.randn(2, D_IN)
    result = {}
    slow = threading.Thread(name="slow-batch", target=lambda: result.setdefault(
        "out", mm(x, adapter_names=["a0", "a0"])))
    slow.start()
    assert inside.wait(10)
    # a0's slot is pinned: other batches may only use the one other slot.
    out = mm(x, adapter_names=["a3", "a3"])
    assert_matches_reference(out, x, ["a3", "a3"], adapters)
    with pytest.raises(lora_ext.SlotTimeoutError, match=r"no device slot became free within 0.3 s for adapters "
                       r"\['a4', 'a5'\]"):
        mm(torch.randn(2, D_IN), adapter_names=["a4", "a5"])  # waits for a0's slot, in vain
    with pytest.raises(RuntimeError, match="in use by a running batch"):
        mm.unload_adapter("a0")
    release.set()
    slow.join(10)
    assert_matches_reference(result["out"], x, ["a0", "a0"], adapters)


def test_churn_with_concurrent_load_and_unload(tmp_path):
    paths = {f"c{i}": write_adapter(tmp_path / f"c{i}", seed=100 + i, rank=1 + i % 8) for i in range(40)}
    extra = {f"x{i}": write_adapter(tmp_path / f"x{i}", seed=500 + i, rank=3) for i in range(4)}
    one = lora_ext.read_peft_adapter("c7", paths["c7"]).nbytes
    mm = lora_ext.patch_model(TinyNet(), max_adapters=4, max_rank=8, host_cache_bytes=6 * one)
    for name, path in paths.items():
        mm.load_adapter(name, path)
    stop, errors = threading.Event(), []

    def churn():
        rng = random.Random(1)
        try:
            while not stop.is_set():
                name = rng.choice(list(extra))
                try:
                    mm.load_adapter(name, extra[name])
                    if rng.random() < 0.5:
                        mm.prefetch([rng.choice(list(paths))])
                    mm.unload_adapter(name)
                except RuntimeError:
                    pass  # every slot pinned at this instant: the loader just tries again
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    worker = threading.Thread(target=churn)
    worker.start()
    rng = random.Random(0)
    try:
        for step in range(500):
            chosen = rng.sample(list(paths), rng.randint(1, 3))
            names = [rng.choice(chosen + ["__base__"]) for _ in range(5)]
            x = torch.randn(5, D_IN)
            out = mm(x, adapter_names=names)
            torch.testing.assert_close(out.double(), reference(x, names, paths), rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"batch {step} {names}: {m}")
    finally:
        stop.set()
        worker.join(30)
    assert not errors, errors
    assert all(p == 0 for p in mm.store.pins()), "a slot stayed pinned after its batch"
    resident = {a["name"] for a in mm.adapters() if a["slot"] is not None}
    assert resident <= set(paths) | set(extra) and len(resident) <= 4
    assert mm.stats()["slot_evictions"] > 100 and mm.stats()["disk_reads"] > 0


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_soak_load_unload_memory_stays_flat(tmp_path):
    """1000 load/unload cycles: process memory grows less than 16 MiB after warm-up (and CUDA
    memory not at all, when a GPU is present)."""
    path = write_adapter(tmp_path / "s", seed=5, rank=8)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mm = lora_ext.patch_model(TinyNet().to(device), max_adapters=2, max_rank=8)
    x = torch.randn(2, D_IN, device=device)
    for _ in range(100):
        mm.load_adapter("s", path)
        mm(x, adapter_names=["s", "__base__"])
        mm.unload_adapter("s")
    rss, cuda = _rss_bytes(), torch.cuda.memory_allocated() if device == "cuda" else 0
    for _ in range(1000):
        mm.load_adapter("s", path)
        mm(x, adapter_names=["s", "__base__"])
        mm.unload_adapter("s")
    assert _rss_bytes() - rss < 16 * 2**20, f"process memory grew by {(_rss_bytes() - rss) / 2**20:.1f} MiB"
    if device == "cuda":
        assert torch.cuda.memory_allocated() == cuda


def test_inspect_prints_modules_ranks_and_scalings(tmp_path, capsys):
    path = write_adapter(tmp_path / "i", seed=1, rank=4, alpha=8.0, config=dict(alpha_pattern={"fc2": 2.0}))
    assert cli_main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "fc1" in out and "fc2" in out and "2.0000" in out and "0.5000" in out and "no problems found" in out
    assert cli_main(["inspect", str(tmp_path / "missing")]) == 1
    assert "problem:" in capsys.readouterr().out
