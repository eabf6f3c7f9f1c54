"""patch_model and MultiLoraModel: many PEFT adapters on one Hugging Face model, each batch row
with its own adapter (or none), through the grouped LoRA ops.

Memory tiers: registered adapters (validated, any number) -> host cache (validated weights in
host memory, LRU within host_cache_bytes) -> device slots (max_adapters per patched layer, LRU,
never evicted while a running batch uses them). A batch brings the adapters it names into slots.
"""

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lora_ext.adapters.host_cache import HostCache
from lora_ext.adapters.peft_format import AdapterError, read_peft_adapter
from lora_ext.adapters.slots import SlotTable
from lora_ext.model.batch import BatchRows, active_batch
from lora_ext.model.lora_layer import LoraLayer
from lora_ext.model.targets import find_target_modules

logger = logging.getLogger("lora_ext")
BASE = "__base__"


@dataclass
class PreparedModule:
    """One module's weights cast to the layer's dtype, ready to copy into a slot."""

    lora_a: torch.Tensor    # (rank, d_in)
    lora_b_t: torch.Tensor  # (rank, d_out): B transposed, as the rank-major slot stores it
    rank: int
    scaling: float


@dataclass
class PreparedAdapter:
    name: str
    modules: dict  # module name -> PreparedModule

    @property
    def nbytes(self):
        return sum(m.lora_a.numel() * m.lora_a.element_size() + m.lora_b_t.numel() * m.lora_b_t.element_size()
                   for m in self.modules.values())


@dataclass
class AdapterRecord:
    name: str
    path: str
    allow_pickle: bool
    ranks: dict     # module -> rank
    scalings: dict  # module -> scaling
    nbytes: int


class MultiLoraModel:
    """A model whose linear layers serve many adapters at once. Use patch_model() to make one."""

    def __init__(self, model, target_modules="all-linear", max_adapters=8, max_rank=64, host_cache_bytes=None):
        for arg, value in (("max_adapters", max_adapters), ("max_rank", max_rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"lora_ext: {arg} must be a positive integer, not {value!r}")
        if getattr(model, "_lora_ext_patched", False) or any(isinstance(m, LoraLayer) for m in model.modules()):
            raise ValueError("lora_ext: this model is already patched; call unpatch() on its MultiLoraModel first")
        self.model = model
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.layers = {}
        self._originals = {}
        for name in find_target_modules(model, target_modules):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
            self._originals[name] = (parent, child, base)
            self.layers[name] = LoraLayer(base, name, max_adapters, max_rank, owner=self)
            setattr(parent, child, self.layers[name])
        model._lora_ext_patched = True
        self._lock = threading.RLock()
        self._registry = {}
        self._host = HostCache(host_cache_bytes)
        self._slots = SlotTable(max_adapters)
        self._merged = None
        self._merge_backup = {}
        self._patched = True
        self._copy_stream = None
        self._pending_copies = {}  # slot -> (event, weights kept alive until the copy is done)
        self._counters = dict(hits=0, misses=0, slot_evictions=0, host_evictions=0, disk_reads=0,
                              load_seconds=0.0)

    # ---- adapters ------------------------------------------------------------------------------

    def load_adapter(self, name, path, *, allow_pickle=False):
        """Validates the PEFT adapter in directory `path` and registers it as `name`.

        Nothing changes unless every check passes: an AdapterError (a ValueError) names the adapter,
        file or module and the values. The adapter goes into a device slot now if one is free, else
        when a batch first names it.
        """
        self._check_patched()
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"lora_ext: adapter name must be a non-empty string other than {BASE!r}, not {name!r}")
        with self._lock:
            if name in self._registry:
                raise ValueError(f"lora_ext: adapter {name!r} is already loaded (from {self._registry[name].path!r}); "
                                 "unload it first")
        started = time.perf_counter()
        prepared, record = self._read_and_prepare(name, path, allow_pickle)
        with self._lock:
            if name in self._registry:
                raise ValueError(f"lora_ext: adapter {name!r} was loaded meanwhile by another thread")
            self._registry[name] = record
            self._cache(name, prepared)
            slot = self._slots.free_or_victim()
            if slot is not None and self._slots.owner[slot] is None:
                self._write_slot(slot, name, prepared)
            self._counters["load_seconds"] += time.perf_counter() - started
        logger.info("loaded adapter %r from %s: %d modules, %d bytes", name, path, len(prepared.modules),
                    prepared.nbytes)

    def unload_adapter(self, name):
        """Forgets `name` and frees its slot and cached weights (refused while a batch uses it)."""
        self._check_patched()
        with self._lock:
            self._require_registered(name)
            if self._merged == name:
                raise ValueError(f"lora_ext: adapter {name!r} is merged into the base weights; unmerge_adapter() first")
            slot = self._slots.release(name)
            if slot is not None:
                for layer in self.layers.values():
                    layer.write_slot(slot, None)
            self._host.remove(name)
            del self._registry[name]
        logger.info("unloaded adapter %r", name)

    def adapters(self):
        """Registered adapters: name, path, whether cached in host memory, device slot, ranks."""
        with self._lock:
            resident = self._slots.resident()
            return [dict(name=r.name, path=r.path, cached=r.name in self._host, slot=resident.get(r.name),
                         modules=len(r.ranks), ranks=sorted(set(r.ranks.values())), bytes=r.nbytes)
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

    # ---- running batches -----------------------------------------------------------------------

    def __call__(self, *args, adapter_names=None, **kwargs):
        """The model's forward; adapter_names gives each batch row its adapter ("__base__"/None: none)."""
        self._check_patched()
        if adapter_names is None:
            return self._call_without_names(self.model, *args, **kwargs)
        with self._batch(adapter_names, self._batch_size(args, kwargs)):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names=None, **kwargs):
        """model.generate with one adapter per input row; beams and returned sequences of a row use
        that row's adapter."""
        self._check_patched()
        if adapter_names is None:
            return self._call_without_names(self.model.generate, *args, **kwargs)
        with self._batch(adapter_names, self._batch_size(args, kwargs)):
            return self.model.generate(*args, **kwargs)

    def prefetch(self, names):
        """Brings adapters into device slots ahead of the batches that will name them."""
        self._check_patched()
        names = list(dict.fromkeys(n for n in names if n not in (None, BASE)))
        with self._lock:
            unknown = sorted(n for n in names if n not in self._registry)
        if unknown:
            raise ValueError(f"lora_ext: unknown adapter(s) {unknown}; loaded: {sorted(self._registry)}")
        slots = self._acquire(names)
        self._release(slots)

    @contextmanager
    def _batch(self, adapter_names, batch_size):
        names = self._row_names(adapter_names, batch_size)
        distinct = list(dict.fromkeys(n for n in names if n is not None))
        slots = self._acquire(distinct)
        try:
            self._wait_for_copies(slots.values())
            row_slots = torch.tensor([slots[n] if n is not None else -1 for n in names], dtype=torch.long,
                                     device=self._device())
            rows = BatchRows(self, row_slots, self.max_adapters, any_adapter=bool(distinct))
            with torch.no_grad(), active_batch(rows):
                yield
        finally:
            self._release(slots)

    def _row_names(self, adapter_names, batch_size):
        if isinstance(adapter_names, str) or not hasattr(adapter_names, "__len__"):
            raise ValueError(f"lora_ext: adapter_names must be a list with one name per batch row, not "
                             f"{type(adapter_names).__name__}")
        if batch_size is not None and len(adapter_names) != batch_size:
            raise ValueError(f"lora_ext: adapter_names has {len(adapter_names)} entries but the batch has "
                             f"{batch_size} rows")
        names = [None if n in (None, BASE) else n for n in adapter_names]
        with self._lock:
            unknown = sorted({n for n in names if n is not None and n not in self._registry})
            if unknown:
                raise ValueError(f"lora_ext: unknown adapter(s) {unknown}; loaded: {sorted(self._registry)}")
            if self._merged is not None:
                others = sorted({str(n) if n is not None else BASE for n in names if n != self._merged})
                if others:
                    raise ValueError(f"lora_ext: adapter {self._merged!r} is merged into the base weights, so rows "
                                     f"asking for {others} cannot be served; unmerge_adapter() first")
                return [None] * len(names)  # the merged weights already hold this adapter
        return names

    def _acquire(self, names):
        """Slots for `names`, bringing missing adapters in and pinning all of them; {name: slot}."""
        if len(names) > self.max_adapters:
            raise ValueError(f"lora_ext: the batch names {len(names)} distinct adapters but there are only "
                             f"{self.max_adapters} device slots (max_adapters)")
        with self._lock:
            slots = {}
            for name in names:  # pin the resident ones first so they cannot be evicted below
                slot = self._slots.slot_of(name)
                if slot is not None:
                    slots[name] = slot
                    self._slots.pin([slot])
                    self._counters["hits"] += 1
            try:
                for name in names:
                    if name in slots:
                        continue
                    self._counters["misses"] += 1
                    slot = self._slots.free_or_victim()
                    if slot is None:
                        raise RuntimeError(f"lora_ext: no device slot is free for adapter {name!r}: all "
                                           f"{self.max_adapters} are in use by running batches")
                    self._write_slot(slot, name, self._prepared(name))
                    slots[name] = slot
                    self._slots.pin([slot])
            except BaseException:
                self._slots.unpin(slots.values())
                raise
            return slots

    def _release(self, slots):
        with self._lock:
            self._slots.unpin(slots.values())

    # ---- merging and unpatching ----------------------------------------------------------------

    def merge_adapter(self, name):
        """Folds `name` into the base weights (single-tenant speed); unmerge_adapter() restores them
        bitwise. While merged, batches may only name that adapter (or no adapter_names at all)."""
        self._check_patched()
        with self._lock:
            self._require_registered(name)
            if self._merged is not None:
                raise ValueError(f"lora_ext: adapter {self._merged!r} is already merged; unmerge_adapter() first")
            prepared = self._prepared(name)
            merged_weights = {}
            for module, weights in prepared.modules.items():
                layer = self.layers[module]
                base = layer.base_layer.weight
                new = (base.float() + layer.delta_weight(weights).to(base.device)).to(base.dtype)
                if not torch.isfinite(new).all():
                    raise AdapterError(f"adapter {name!r}: merging into module {module!r} overflows {base.dtype}")
                merged_weights[module] = new
            for module, new in merged_weights.items():
                base = self.layers[module].base_layer.weight
                self._merge_backup[module] = base.detach().clone()
                with torch.no_grad():
                    base.copy_(new)
            self._merged = name
        logger.info("merged adapter %r into %d modules", name, len(prepared.modules))

    def unmerge_adapter(self):
        """Restores the base weights exactly as they were before merge_adapter()."""
        with self._lock:
            if self._merged is None:
                raise ValueError("lora_ext: no adapter is merged")
            for module, original in self._merge_backup.items():
                with torch.no_grad():
                    self.layers[module].base_layer.weight.copy_(original)
            self._merge_backup.clear()
            self._merged = None

    def unpatch(self):
        """Puts the original modules back (unmerging first) and returns the model."""
        self._check_patched()
        with self._lock:
            if self._merged is not None:
                self.unmerge_adapter()
            for parent, child, base in self._originals.values():
                setattr(parent, child, base)
            self.model._lora_ext_patched = False
            self._patched = False
            self.layers.clear()
        return self.model

    # ---- internals -----------------------------------------------------------------------------

    def _check_patched(self):
        if not self._patched:
            raise RuntimeError("lora_ext: this MultiLoraModel was unpatched; patch the model again to use adapters")

    def _require_registered(self, name):
        if name not in self._registry:
            raise ValueError(f"lora_ext: unknown adapter {name!r}; loaded: {sorted(self._registry)}")

    def _device(self):
        return next(iter(self.layers.values())).lora_a.device

    def _call_without_names(self, fn, *args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    @staticmethod
    def _batch_size(args, kwargs):
        for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                return value.shape[0]
        return None

    def _read_and_prepare(self, name, path, allow_pickle):
        adapter = read_peft_adapter(name, path, allow_pickle=allow_pickle)
        prepared = self._prepare(adapter)
        record = AdapterRecord(name, str(path), allow_pickle, {m: w.rank for m, w in adapter.modules.items()},
                               {m: w.scaling for m, w in adapter.modules.items()}, prepared.nbytes)
        return prepared, record

    def _prepare(self, adapter):
        """Checks every module against the patched layers and casts the weights to their dtypes."""
        unknown = sorted(m for m in adapter.modules if m not in self.layers)
        if unknown:
            raise AdapterError(f"adapter {adapter.name!r}: weights for modules that are not patched: {unknown[:5]}"
                               f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)} of {len(adapter.modules)}); "
                               f"patched modules look like {sorted(self.layers)[:3]}")
        pin = torch.cuda.is_available() and self._device().type == "cuda"
        modules = {}
        for module, w in adapter.modules.items():
            layer = self.layers[module]
            where = f"adapter {adapter.name!r}: module {module!r}"
            if w.lora_a.shape[1] != layer.in_features or w.lora_b.shape[0] != layer.out_features:
                raise AdapterError(f"{where}: lora_A {tuple(w.lora_a.shape)} and lora_B {tuple(w.lora_b.shape)} do not "
                                   f"fit the layer ({layer.in_features} -> {layer.out_features})")
            if w.rank > self.max_rank:
                raise AdapterError(f"{where}: rank {w.rank} exceeds max_rank={self.max_rank}")
            a = w.lora_a.to(layer.dtype).contiguous()
            b_t = w.lora_b.T.to(layer.dtype).contiguous()
            if not (torch.isfinite(a).all() and torch.isfinite(b_t).all()):
                raise AdapterError(f"{where}: weights overflow to infinity when cast to {layer.dtype}")
            if pin:
                a, b_t = a.pin_memory(), b_t.pin_memory()
            modules[module] = PreparedModule(a, b_t, w.rank, w.scaling)
        return PreparedAdapter(adapter.name, modules)

    def _prepared(self, name):
        """The adapter's prepared weights from the host cache, or read again from its files."""
        prepared = self._host.get(name)
        if prepared is None:
            record = self._registry[name]
            self._counters["disk_reads"] += 1
            prepared, _ = self._read_and_prepare(name, record.path, record.allow_pickle)
            self._cache(name, prepared)
        return prepared

    def _cache(self, name, prepared):
        for evicted in self._host.put(name, prepared):
            self._counters["host_evictions"] += 1
            logger.info("host cache: evicted adapter %r", evicted)

    def _write_slot(self, slot, name, prepared):
        evicted = self._slots.assign(slot, name)
        if evicted is not None:
            self._counters["slot_evictions"] += 1
            logger.info("device slot %d: evicted adapter %r for %r", slot, evicted, name)
        device = self._device()
        if device.type != "cuda":
            for module, layer in self.layers.items():
                layer.write_slot(slot, prepared.modules.get(module))
            return
        # On a GPU the copy runs on a side stream; batches that use the slot wait on its event,
        # never on the whole device. The side stream first waits for work already queued on the
        # current stream, which may still read the slot's previous adapter.
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        self._copy_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._copy_stream):
            for module, layer in self.layers.items():
                layer.write_slot(slot, prepared.modules.get(module), non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        self._pending_copies[slot] = (event, prepared)

    def _wait_for_copies(self, slots):
        """Makes the current stream wait for copies into these slots (CUDA only)."""
        with self._lock:
            for slot in slots:
                pending = self._pending_copies.get(slot)
                if pending is None:
                    continue
                torch.cuda.current_stream(self._device()).wait_event(pending[0])
                if pending[0].query():
                    del self._pending_copies[slot]


def patch_model(model, target_modules="all-linear", max_adapters=8, max_rank=64, host_cache_bytes=None):
    """Patches `model` in place so every batch row can use its own LoRA adapter.

    Args:
        model: a transformers model (or any torch module with Linear / Conv1D layers).
        target_modules: "all-linear" (every linear layer but the output head), a regex matched
            against full module names, or a list of module name suffixes (PEFT's semantics).
        max_adapters: device slots per patched layer (adapters usable in one batch).
        max_rank: the largest adapter rank a slot holds.
        host_cache_bytes: budget of validated adapter weights kept in host memory (None: no limit).
    Returns:
        MultiLoraModel
    """
    return MultiLoraModel(model, target_modules, max_adapters, max_rank, host_cache_bytes)
