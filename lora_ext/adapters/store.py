"""The adapter memory manager: which adapters are known, which sit in host memory, which occupy
device slots, and the copies between them.

Three tiers:
    registered   validated at register(), any number; only the record is kept
    host cache   validated weights cast to each layer's dtype (pinned when serving on a GPU),
                 least recently used evicted beyond host_cache_bytes; an evicted adapter is read
                 again from its files when next needed
    device slots max_adapters preallocated slots in every patched layer; a batch pins the slots
                 of its adapters, and a pinned slot is never evicted or overwritten

Thread-safe: every public method takes the store's lock. A batch that finds the slots it needs
pinned by running batches waits for them (first come first served, all or nothing, up to
slot_timeout seconds). On a GPU, copies into a slot run on a
side stream; a batch makes its stream wait on the slot's event (wait_for_copies), never on the
whole device.
"""

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from lora_ext.adapters.host_cache import HostCache
from lora_ext.adapters.peft_format import AdapterError, read_peft_adapter
from lora_ext.adapters.slots import SlotTable

logger = logging.getLogger("lora_ext")
DEFAULT_SLOT_TIMEOUT = 60.0  # seconds a batch waits for device slots before SlotTimeoutError


class SlotTimeoutError(RuntimeError):
    """A batch waited slot_timeout seconds and running batches still held the device slots it needs."""


@dataclass
class ModuleSlotWeights:
    """One module's weights cast to its layer's dtype, as a slot stores them; a lora_B bias and
    DoRA's per-output scale g stay float32 (lora_ext/model/row_epilogue.py)."""

    lora_a: torch.Tensor    # (rank, d_in)
    lora_b_t: torch.Tensor  # (rank, d_out): B transposed, as the rank-major slot stores it
    rank: int
    scaling: float
    lora_bias: torch.Tensor = None   # (d_out,) lora_bias=True
    dora_scale: torch.Tensor = None  # (d_out,) DoRA: g = m / ||W + scaling B A||

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.lora_a, self.lora_b_t, self.lora_bias, self.dora_scale)
                   if t is not None)


@dataclass
class AdapterSlotWeights:
    """All of one adapter's modules, ready to copy into a slot (what the host cache holds)."""

    name: str
    modules: dict  # module name -> ModuleSlotWeights
    saved: dict = field(default_factory=dict)  # modules_to_save: module name -> {"weight": t, "bias": t}

    @property
    def nbytes(self):
        return sum(m.nbytes for m in self.modules.values()) + sum(
            t.numel() * t.element_size() for copy in self.saved.values() for t in copy.values())


@dataclass(frozen=True)
class AdapterRecord:
    """What the registry keeps of an adapter: where to read it again and what it holds."""

    name: str
    path: str
    allow_pickle: bool
    ranks: dict     # module -> rank
    scalings: dict  # module -> scaling
    nbytes: int     # bytes of its weights in the layers' dtype (copies of saved modules included)
    saved: tuple = ()  # modules_to_save: the modules it has its own copy of


class AdapterStore:
    """Registry, host cache and device slots of the adapters of one patched model.

    layers: {module name: layer}; each layer has in_features, out_features (what its slots hold),
    full_shape (the (d_in, d_out) adapter files hold), shard(lora_a, lora_b) (its part of them),
    dtype, device and write_slot(slot, ModuleSlotWeights or None, non_blocking)
    (lora_ext.model.LoraLayer).
    """

    def __init__(self, layers, max_adapters, max_rank, host_cache_bytes=None, slot_timeout=DEFAULT_SLOT_TIMEOUT,
                 saved_layers=None):
        self.layers = layers
        self.saved_layers = saved_layers or {}  # modules_to_save: {module name: SavedModuleLayer}
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.slot_timeout = slot_timeout
        self._lock = threading.RLock()
        self._slot_freed = threading.Condition(self._lock)
        self._waiting = collections.deque()  # batches waiting for slots, first come first served
        self._registry = {}
        self._host = HostCache(host_cache_bytes)
        self._slots = SlotTable(max_adapters)
        self._trainable = {}      # name -> TrainableAdapter (its weights live there, not in the host cache)
        self._slot_versions = {}  # slot -> the trainable adapter's version when copied in (None otherwise)
        self._copy_stream = None
        self._pending_copies = {}  # slot -> (event, weights kept alive until the copy is done)
        self._counters = dict(hits=0, misses=0, slot_evictions=0, host_evictions=0, disk_reads=0,
                              load_seconds=0.0)

    # ---- registry --------------------------------------------------------------------------------

    def register(self, name, path, *, allow_pickle=False):
        """Validates the PEFT adapter directory `path` against the layers and registers it as
        `name`; it takes a free device slot now if there is one. Nothing changes unless every
        check passes (an AdapterError names the adapter, file or module and the values)."""
        with self._lock:
            if name in self._registry:
                raise ValueError(f"lora_ext: adapter {name!r} is already loaded (from {self._registry[name].path!r}); "
                                 "unload it first")
        started = time.perf_counter()
        weights, record = self._read_for_slots(name, path, allow_pickle)
        with self._lock:
            if name in self._registry:
                raise ValueError(f"lora_ext: adapter {name!r} was loaded meanwhile by another thread")
            self._registry[name] = record
            self._cache(name, weights)
            slot = self._slots.free_or_victim()
            if slot is not None and self._slots.owner[slot] is None:
                self._write_slot(slot, name, weights)
            self._counters["load_seconds"] += time.perf_counter() - started
        logger.info("loaded adapter %r from %s: %d modules, %d bytes", name, path, len(weights.modules),
                    weights.nbytes)

    def unregister(self, name):
        """Forgets `name`, frees its slot and cached weights (refused while a batch uses it)."""
        with self._lock:
            self.record(name)  # refuses unknown names
            slot = self._slots.release(name)
            if slot is not None:
                for layer in (*self.layers.values(), *self.saved_layers.values()):
                    layer.write_slot(slot, None)
            self._host.remove(name)
            self._trainable.pop(name, None)
            del self._registry[name]
        logger.info("unloaded adapter %r", name)

    def register_trainable(self, trainable, path=None):
        """Registers a TrainableAdapter (lora_ext/adapters/trainable.py): its leaves are its host
        weights (never evicted: there may be no file to read them again from); a batch copies them
        into a slot, again whenever they changed since (an optimizer step)."""
        name = trainable.name
        with self._lock:
            if name in self._registry:
                raise ValueError(f"lora_ext: adapter {name!r} is already loaded (from {self._registry[name].path!r}); "
                                 "unload it first")
            weights = self._cast_for_slots(trainable)
            self._registry[name] = AdapterRecord(name, None if path is None else str(path), False,
                                                 {m: w.rank for m, w in trainable.modules.items()},
                                                 {m: w.scaling for m, w in trainable.modules.items()}, weights.nbytes,
                                                 tuple(sorted(weights.saved)))
            self._trainable[name] = trainable
        logger.info("added trainable adapter %r: %d modules", name, len(trainable.modules))

    def trainable(self, name):
        """The TrainableAdapter registered as `name`, or None for a frozen one."""
        with self._lock:
            self.record(name)  # refuses unknown names
            return self._trainable.get(name)

    def trainable_names(self):
        with self._lock:
            return list(self._trainable)

    def require(self, names):
        """Raises ValueError naming every name in `names` that is not registered."""
        with self._lock:
            unknown = sorted(set(names) - set(self._registry))
            if unknown:
                raise ValueError(f"lora_ext: unknown adapter(s) {unknown}; loaded: {sorted(self._registry)}")

    def __contains__(self, name):
        with self._lock:
            return name in self._registry

    # ---- public queries --------------------------------------------------------------------------

    def record(self, name):
        """The AdapterRecord of a registered adapter (ranks, scalings, bytes, path)."""
        with self._lock:
            if name not in self._registry:
                raise ValueError(f"lora_ext: unknown adapter {name!r}; loaded: {sorted(self._registry)}")
            return self._registry[name]

    def adapter_bytes(self, name):
        """Bytes of `name`'s weights in the layers' dtype (what one slot holds of it)."""
        return self.record(name).nbytes

    def resident(self):
        """{adapter name: device slot} of the adapters in device slots now."""
        with self._lock:
            return self._slots.resident()

    def pins(self):
        """Running batches (and prefetches) using each slot, by slot index."""
        with self._lock:
            return list(self._slots.pins)

    def adapters(self):
        """Registered adapters: name, path, whether cached in host memory, device slot, ranks."""
        with self._lock:
            resident = self._slots.resident()
            return [dict(name=r.name, path=r.path, cached=r.name in self._host, slot=resident.get(r.name),
                         modules=len(r.ranks), ranks=sorted(set(r.ranks.values())), bytes=r.nbytes,
                         modules_to_save=list(r.saved))
                    for r in self._registry.values()]

    def stats(self):
        """Counts and bytes per tier, hits, misses, evictions and load time."""
        with self._lock:
            resident = self._slots.resident()
            return dict(registered=len(self._registry), cached=len(self._host.names()), resident=len(resident),
                        registered_bytes=sum(r.nbytes for r in self._registry.values()),
                        host_cache_bytes=self._host.bytes,
                        device_slot_bytes=sum(self._registry[n].nbytes for n in resident),
                        device_slots=self.max_adapters, **self._counters)

    def slot_weights(self, name):
        """`name`'s weights as the slots store them (from the host cache, or read again)."""
        with self._lock:
            self.record(name)  # refuses unknown names
            return self._host_weights(name)

    # ---- device slots ----------------------------------------------------------------------------

    def acquire(self, names, timeout=None):
        """Slots for `names`, bringing missing adapters in and pinning all of them; {name: slot}.
        Every name must be registered. Release the slots with release().

        All or nothing: when the free and evictable slots cannot hold every missing adapter now,
        nothing is pinned and the call waits until running batches release slots, first come first
        served (a batch that needs many slots is not overtaken forever by batches that need few,
        and no batch holds slots while it waits, so batches cannot deadlock). After `timeout`
        seconds (default: the store's slot_timeout) it raises SlotTimeoutError. Only a batch that
        alone names more adapters than there are slots is refused at once."""
        if len(names) > self.max_adapters:
            raise ValueError(f"lora_ext: the batch names {len(names)} distinct adapters but there are only "
                             f"{self.max_adapters} device slots (max_adapters)")
        timeout = self.slot_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._slot_freed:
            if not self._waiting:
                slots = self._try_acquire(names)
                if slots is not None:
                    return slots
            me = object()
            self._waiting.append(me)
            try:
                while True:
                    if self._waiting[0] is me:
                        slots = self._try_acquire(names)
                        if slots is not None:
                            return slots
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise SlotTimeoutError(
                            f"lora_ext: no device slot became free within {timeout:g} s for adapters "
                            f"{sorted(n for n in names if self._slots.slot_of(n) is None)} of a batch naming "
                            f"{sorted(names)}: all {self.max_adapters} slots are in use by running batches "
                            "(raise max_adapters or slot_timeout)")
                    self._slot_freed.wait(left)
            finally:
                self._waiting.remove(me)
                self._slot_freed.notify_all()

    def release(self, slots):
        """Unpins slots that acquire() returned ({name: slot} or the slot indices) and wakes the
        batches waiting for slots."""
        with self._slot_freed:
            self._slots.unpin(slots.values() if isinstance(slots, dict) else slots)
            self._slot_freed.notify_all()

    def _try_acquire(self, names):
        """{name: slot} with every slot pinned, or None (and nothing changed) when the free and
        evictable slots cannot hold the adapters of `names` that are not resident."""
        self.require(names)  # an adapter may have been unloaded while the batch waited
        resident = {n: self._slots.slot_of(n) for n in names if self._slots.slot_of(n) is not None}
        missing = [n for n in names if n not in resident]
        if self._slots.available(exclude=resident.values()) < len(missing):
            return None
        for name, slot in resident.items():  # a trainable adapter trained since it was copied in
            trainable = self._trainable.get(name)
            if trainable is not None and self._slot_versions.get(slot) != trainable.version() \
                    and self._slots.pins[slot] == 0:
                self._copy_into_slot(slot, name, self._host_weights(name))
        slots = dict(resident)
        self._slots.pin(slots.values())  # the resident ones first, so they cannot be evicted below
        self._counters["hits"] += len(resident)
        try:
            for name in missing:
                self._counters["misses"] += 1
                slot = self._slots.free_or_victim()
                self._write_slot(slot, name, self._host_weights(name))
                slots[name] = slot
                self._slots.pin([slot])
        except BaseException:
            self._slots.unpin(slots.values())
            raise
        return slots

    def wait_for_copies(self, slots):
        """Makes the current CUDA stream wait for copies into these slots (no-op on CPU)."""
        with self._lock:
            for slot in slots:
                pending = self._pending_copies.get(slot)
                if pending is None:
                    continue
                torch.cuda.current_stream(self._device()).wait_event(pending[0])
                if pending[0].query():
                    del self._pending_copies[slot]

    # ---- internals -------------------------------------------------------------------------------

    def _device(self):
        return next(iter(self.layers.values())).device

    def _read_for_slots(self, name, path, allow_pickle):
        adapter = read_peft_adapter(name, path, allow_pickle=allow_pickle, max_rank=self.max_rank,
                                    modules={m: layer.full_shape for m, layer in self.layers.items()},
                                    saved_modules={m: layer.shapes for m, layer in self.saved_layers.items()})
        for module, w in adapter.modules.items():  # tensor parallelism: keep only this rank's part
            w.lora_a, w.lora_b = self.layers[module].shard(w.lora_a, w.lora_b)
        weights = self._cast_for_slots(adapter)
        record = AdapterRecord(name, str(path), allow_pickle, {m: w.rank for m, w in adapter.modules.items()},
                               {m: w.scaling for m, w in adapter.modules.items()}, weights.nbytes,
                               tuple(sorted(weights.saved)))
        return weights, record

    def _cast_for_slots(self, adapter):
        """Casts every module's weights to its layer's dtype (which modules, shapes and ranks fit
        the layers the reader checked, from the file's header); refuses weights or scalings that
        overflow in that dtype."""
        pin = torch.cuda.is_available() and self._device().type == "cuda"
        modules = {}
        for module, w in adapter.modules.items():
            layer = self.layers[module]
            where = f"adapter {adapter.name!r}: module {module!r}"
            a = w.lora_a.detach().to(layer.dtype).contiguous()
            b_t = w.lora_b.detach().T.to(layer.dtype).contiguous()
            if not (torch.isfinite(a).all() and torch.isfinite(b_t).all()):
                raise AdapterError(f"{where}: weights overflow to infinity when cast to {layer.dtype}")
            if not torch.isfinite(torch.tensor(w.scaling, dtype=layer.dtype)):
                raise AdapterError(f"{where}: scaling {w.scaling:g} (from lora_alpha and r) overflows to infinity in "
                                   f"{layer.dtype}")
            if getattr(w, "base_copy", None) is not None:
                layer.check_base_copy(w.base_copy, where)
            bias, g = self._row_extras(layer, w, where)
            if pin and a.device.type == "cpu":  # (a trainable adapter's leaves may already be on the GPU)
                a, b_t = a.pin_memory(), b_t.pin_memory()
            modules[module] = ModuleSlotWeights(a, b_t, w.rank, w.scaling, bias, g)
        saved = {}
        for module, copy in getattr(adapter, "saved", {}).items():
            layer = self.saved_layers[module]
            saved[module] = {which: t.detach().to(layer.dtype).contiguous() for which, t in copy.items()}
            if not all(torch.isfinite(t).all() for t in saved[module].values()):
                raise AdapterError(f"adapter {adapter.name!r}: modules_to_save module {module!r} overflows to infinity "
                                   f"when cast to {layer.dtype}")
            if pin:
                saved[module] = {which: t.pin_memory() if t.device.type == "cpu" else t for which, t in saved[module].items()}
        return AdapterSlotWeights(adapter.name, modules, saved)

    @staticmethod
    def _row_extras(layer, w, where):
        """(lora_B bias, DoRA's g) of one module, float32, or None each."""
        bias, magnitude = getattr(w, "lora_bias", None), getattr(w, "magnitude", None)
        if bias is None and magnitude is None:
            return None, None
        what = 'DoRA' if magnitude is not None else 'a lora_B bias'
        if layer.sharding is not None or layer.is_embedding:
            raise AdapterError(f"{where}: {what} on {'a tensor-parallel' if layer.sharding else 'an embedding'} layer "
                               "is not supported yet")
        if bias is not None:
            bias = bias.detach().float().contiguous()
        if magnitude is not None:
            magnitude = layer.dora_scale(w.lora_a, w.lora_b, w.scaling, magnitude, where)
        return bias, magnitude

    def _host_weights(self, name):
        """The adapter's slot weights: a trainable adapter's current weights cast to the layers'
        dtypes, else from the host cache, or read again from its files."""
        trainable = self._trainable.get(name)
        if trainable is not None:
            return self._cast_for_slots(trainable)
        weights = self._host.get(name)
        if weights is None:
            record = self._registry[name]
            self._counters["disk_reads"] += 1
            weights, _ = self._read_for_slots(name, record.path, record.allow_pickle)
            self._cache(name, weights)
        return weights

    def _cache(self, name, weights):
        for evicted in self._host.put(name, weights):
            self._counters["host_evictions"] += 1
            logger.info("host cache: evicted adapter %r", evicted)

    def _write_slot(self, slot, name, weights):
        evicted = self._slots.assign(slot, name)
        if evicted is not None:
            self._counters["slot_evictions"] += 1
            logger.info("device slot %d: evicted adapter %r for %r", slot, evicted, name)
        self._copy_into_slot(slot, name, weights)

    def _copy_into_slot(self, slot, name, weights):
        trainable = self._trainable.get(name)
        self._slot_versions[slot] = trainable.version() if trainable is not None else None
        device = self._device()
        if device.type != "cuda":
            for module, layer in self.layers.items():
                layer.write_slot(slot, weights.modules.get(module))
            for module, layer in self.saved_layers.items():
                layer.write_slot(slot, weights.saved.get(module))
            return
        # On a GPU the copy runs on a side stream; batches that use the slot wait on its event,
        # never on the whole device. The side stream first waits for work already queued on the
        # current stream, which may still read the slot's previous adapter.
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        self._copy_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._copy_stream):
            for module, layer in self.layers.items():
                layer.write_slot(slot, weights.modules.get(module), non_blocking=True)
            for module, layer in self.saved_layers.items():
                layer.write_slot(slot, weights.saved.get(module), non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        self._pending_copies[slot] = (event, weights)
