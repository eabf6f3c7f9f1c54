"""Concurrent batches wait for device slots instead of failing: all or nothing, first come first
served, no deadlock, a clear error after slot_timeout; every row still matches the PEFT oracle."""

import random
import threading
import time

import pytest
import torch

import lora_ext
from test_adapter_memory import D_IN, TinyNet, peft_lora, reference as per_row_reference, write_adapter

BASE = TinyNet()  # built once: TinyNet() seeds the global generator, which other threads draw from


@pytest.fixture
def paths(tmp_path):
    paths = {f"a{i}": write_adapter(tmp_path / f"a{i}", seed=i, rank=1 + i % 6) for i in range(12)}
    for path in paths.values():
        peft_lora(path)  # PEFT's weights read once, before any thread starts
    return paths


def reference(x, names, paths):
    """Each row alone through the base model and its adapter as PEFT loads it (float64)."""
    return per_row_reference(x, names, paths, base=BASE)


def rows(count, rng):
    """Inputs from a thread's own generator (the global one is shared by every thread)."""
    return torch.randn(count, D_IN, generator=torch.Generator().manual_seed(rng.randrange(2**31)))


def loaded(paths, slots, **kwargs):
    mm = lora_ext.patch_model(TinyNet(), max_adapters=slots, max_rank=8, **kwargs)
    for name, path in paths.items():
        mm.load_adapter(name, path)
    return mm


def holder(mm, names, inside, release):
    """A batch that pins `names` and pauses inside the model until `release` is set."""
    def pause(module, inputs, output):
        if threading.current_thread().name == "holder":
            inside.set()
            release.wait(20)

    handle = mm.model.fc2.register_forward_hook(pause)
    thread = threading.Thread(name="holder", target=lambda: mm(torch.randn(len(names), D_IN), adapter_names=names))
    thread.start()
    assert inside.wait(20)
    return thread, handle


def test_a_batch_waits_for_slots_and_then_runs(paths):
    mm = loaded(paths, slots=2)
    inside, release = threading.Event(), threading.Event()
    thread, handle = holder(mm, ["a0", "a0"], inside, release)
    x, names, result = torch.randn(2, D_IN), ["a4", "a5"], {}
    waiter = threading.Thread(target=lambda: result.setdefault("out", mm(x, adapter_names=names)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and "out" not in result, "the batch should wait while a0's batch holds a slot"
    release.set()
    waiter.join(20)
    thread.join(20)
    handle.remove()
    torch.testing.assert_close(result["out"].double(), reference(x, names, paths), rtol=1e-4, atol=1e-4)
    assert mm.store.pins() == [0, 0]


def test_timeout_is_a_clear_error_and_changes_nothing(paths):
    mm = loaded(paths, slots=2, slot_timeout=0.2)
    inside, release = threading.Event(), threading.Event()
    thread, handle = holder(mm, ["a0"], inside, release)
    resident, pins = mm.store.resident(), mm.store.pins()
    started = time.monotonic()
    with pytest.raises(lora_ext.SlotTimeoutError, match=r"within 0.2 s for adapters \['a6', 'a7'\] of a batch naming "
                       r"\['a6', 'a7'\]: all 2 slots are in use by running batches"):
        mm(torch.randn(2, D_IN), adapter_names=["a6", "a7"])
    assert 0.2 <= time.monotonic() - started < 5
    assert mm.store.resident() == resident and mm.store.pins() == pins
    release.set()
    thread.join(20)
    handle.remove()
    out = mm(torch.randn(2, D_IN), adapter_names=["a6", "a7"])  # now there is room
    assert out.shape == (2, 16)


def test_a_batch_naming_more_adapters_than_slots_is_refused_at_once(paths):
    mm = loaded(paths, slots=2, slot_timeout=30)
    started = time.monotonic()
    with pytest.raises(ValueError, match="names 3 distinct adapters but there are only 2 device slots"):
        mm(torch.randn(3, D_IN), adapter_names=["a0", "a1", "a2"])
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("kwargs,pattern", [(dict(slot_timeout=-1), "slot_timeout must be a finite number"),
                                            (dict(slot_timeout="5"), "slot_timeout must be"),
                                            (dict(slot_timeout=float("inf")), "slot_timeout must be")])
def test_bad_slot_timeout_refused(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        lora_ext.patch_model(TinyNet(), max_adapters=2, max_rank=8, **kwargs)


def run_threads(target, count, limit):
    errors = []

    def guarded(i):
        try:
            target(i)
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit)
    assert not any(t.is_alive() for t in threads), f"threads still running after {limit} s: a deadlock?"
    assert not errors, errors
    return time.monotonic() - started


def test_batches_that_each_need_most_slots_never_deadlock(paths):
    """Four slots; every batch needs three distinct adapters, so no two fit at once unless they
    share adapters: all-or-nothing acquisition must still let every batch through."""
    mm = loaded(paths, slots=4)
    names = sorted(paths)

    def serve(i):
        rng = random.Random(i)
        for _ in range(15):
            chosen = rng.sample(names, 3)
            x = rows(3, rng)
            out = mm(x, adapter_names=chosen)
            torch.testing.assert_close(out.double(), reference(x, chosen, paths), rtol=1e-4, atol=1e-4)

    run_threads(serve, count=4, limit=120)
    assert mm.store.pins() == [0] * 4


def test_many_threads_serve_mixed_batches_that_match_peft(paths):
    """Six threads, twelve adapters through four slots with eviction under load: no batch fails,
    every row matches the per-row PEFT oracle, and the run ends within its limit."""
    mm = loaded(paths, slots=4)
    names = sorted(paths)

    def serve(i):
        rng = random.Random(100 + i)
        for _ in range(25):
            chosen = rng.sample(names, rng.randint(1, 4))
            per_row = [rng.choice(chosen + ["__base__"]) for _ in range(5)]
            x = rows(5, rng)
            out = mm(x, adapter_names=per_row)
            torch.testing.assert_close(out.double(), reference(x, per_row, paths), rtol=1e-4, atol=1e-4)

    run_threads(serve, count=6, limit=180)
    assert mm.stats()["slot_evictions"] > 20
    assert mm.store.pins() == [0] * 4


def test_a_batch_needing_every_slot_is_not_starved(paths):
    """While other threads keep running one-adapter batches, a batch that needs all four slots
    still gets them (first come first served), well before its timeout."""
    mm = loaded(paths, slots=4, slot_timeout=30)
    stop = threading.Event()

    def small(i):
        rng = random.Random(i)
        while not stop.is_set():
            mm(rows(2, rng), adapter_names=[rng.choice(["a0", "a1", "a2", "a3"])] * 2)

    workers = [threading.Thread(target=small, args=(i,)) for i in range(3)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.2)
        x, big = rows(4, random.Random(7)), ["a8", "a9", "a10", "a11"]
        started = time.monotonic()
        out = mm(x, adapter_names=big)
        assert time.monotonic() - started < 20
        torch.testing.assert_close(out.double(), reference(x, big, paths), rtol=1e-4, atol=1e-4)
    finally:
        stop.set()
        for w in workers:
            w.join(20)


def test_prefetch_waits_for_slots_too(paths):
    mm = loaded(paths, slots=2)
    inside, release = threading.Event(), threading.Event()
    thread, handle = holder(mm, ["a0"], inside, release)
    done = threading.Event()
    prefetcher = threading.Thread(target=lambda: (mm.prefetch(["a8", "a9"]), done.set()))
    prefetcher.start()
    time.sleep(0.3)
    assert not done.is_set()
    release.set()
    prefetcher.join(20)
    thread.join(20)
    handle.remove()
    assert done.is_set() and {"a8", "a9"} <= set(mm.store.resident())
