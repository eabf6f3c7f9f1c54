"""patch_model and MultiLoraModel: many PEFT adapters on one Hugging Face model, each batch row
with its own adapter (or none), through the grouped LoRA ops.

MultiLoraModel patches and unpatches the model, merges one adapter into the base weights, and runs
batches; which adapters are known, cached and resident is the AdapterStore's business
(lora_ext/adapters/store.py), reached as `mm.store`.
"""

import logging
import threading
from contextlib import contextmanager

import torch

from lora_ext.adapters.config import names_module
from lora_ext.adapters.peft_format import AdapterError
from lora_ext.adapters.store import DEFAULT_SLOT_TIMEOUT, AdapterStore
from lora_ext.model.batch import BatchRows, active_batch
from lora_ext.model.lora_layer import LoraLayer
from lora_ext.model.saved_module import SavedModuleLayer
from lora_ext.model.targets import find_target_modules
from lora_ext.model.tensor_parallel import check_same_batch, sharding_of
from lora_ext.model.train_batch import TrainBatch
from lora_ext.model.training import TrainingMixin

logger = logging.getLogger("lora_ext")
BASE_ADAPTER = "__base__"  # the adapter name of rows that use the base model alone


class MultiLoraModel(TrainingMixin):
    """A model whose linear layers serve (and train) many adapters at once. Use patch_model() to
    make one.

    `store` (an AdapterStore) holds the adapters: registry, host cache, device slots, stats.
    """

    def __init__(self, model, target_modules="all-linear", max_adapters=8, max_rank=64, host_cache_bytes=None,
                 slot_timeout=DEFAULT_SLOT_TIMEOUT, modules_to_save=None):
        for arg, value in (("max_adapters", max_adapters), ("max_rank", max_rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"lora_ext: {arg} must be a positive integer, not {value!r}")
        if isinstance(slot_timeout, bool) or not isinstance(slot_timeout, (int, float)) or not slot_timeout >= 0 \
                or slot_timeout == float("inf"):
            raise ValueError(f"lora_ext: slot_timeout must be a finite number of seconds >= 0, not {slot_timeout!r}")
        if getattr(model, "_lora_ext_patched", False) or any(isinstance(m, (LoraLayer, SavedModuleLayer))
                                                                 for m in model.modules()):
            raise ValueError("lora_ext: this model is already patched; call unpatch() on its MultiLoraModel first")
        self.model = model
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.layers = {}
        self._originals = {}
        targets = find_target_modules(model, target_modules)
        shardings = {name: sharding_of(model, name, model.get_submodule(name)) for name in targets}
        self._tp_group = _one_group(shardings)  # tensor parallelism: the ranks' process group, else None
        saved = find_saved_modules(model, modules_to_save, targets)
        # every wrapper is built (and may refuse its module) before the first one goes into the
        # model, so a refused patch leaves the model as it was
        self.layers = {name: LoraLayer(model.get_submodule(name), name, max_adapters, max_rank, owner=self,
                                       sharding=shardings[name]) for name in targets}
        self.saved_layers = {name: SavedModuleLayer(model.get_submodule(name), name, max_adapters, owner=self)
                             for name in saved}
        for name, wrapper in (*self.layers.items(), *self.saved_layers.items()):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            self._originals[name] = (parent, child, getattr(parent, child))
            setattr(parent, child, wrapper)
        model._lora_ext_patched = True
        self.store = AdapterStore(self.layers, max_adapters, max_rank, host_cache_bytes, slot_timeout,
                                  saved_layers=self.saved_layers)
        self._lock = threading.RLock()  # guards the merged state
        self._merged = None
        self._merge_backup = {}
        self._patched = True
        self._compiled = False  # compile() was called

    # ---- adapters ------------------------------------------------------------------------------

    def load_adapter(self, name, path, *, allow_pickle=False, trainable=False):
        """Validates the PEFT adapter in directory `path` and registers it as `name`.

        Nothing changes unless every check passes: an AdapterError (a ValueError) names the adapter,
        file or module and the values. The adapter goes into a device slot now if one is free, else
        when a batch first names it. trainable=True: its weights become float32 leaves to continue
        training (adapter_parameters).
        """
        self._check_patched()
        self._check_new_name(name)
        if trainable:
            self._load_trainable(name, path, allow_pickle)
        else:
            self.store.register(name, path, allow_pickle=allow_pickle)

    def _check_new_name(self, name):
        if not isinstance(name, str) or not name or name == BASE_ADAPTER:
            raise ValueError(f"lora_ext: adapter name must be a non-empty string other than {BASE_ADAPTER!r}, "
                             f"not {name!r}")

    def unload_adapter(self, name):
        """Forgets `name` and frees its slot and cached weights (refused while a batch uses it)."""
        self._check_patched()
        with self._lock:
            self.store.record(name)  # refuses unknown names
            if self._merged == name:
                raise ValueError(f"lora_ext: adapter {name!r} is merged into the base weights; unmerge_adapter() first")
            self.store.unregister(name)

    def adapters(self):
        """Registered adapters: name, path, whether cached in host memory, device slot, ranks."""
        return self.store.adapters()

    def stats(self):
        """Counts and bytes per tier, hits, misses, evictions and load time."""
        return self.store.stats()

    # ---- running batches -----------------------------------------------------------------------

    def __call__(self, *args, adapter_names=None, **kwargs):
        """The model's forward; adapter_names gives each batch row its adapter ("__base__"/None: none).
        In training mode (train()) autograd records it; otherwise it runs without gradients."""
        self._check_patched()
        if self.training:
            return self._train_call(args, kwargs, adapter_names)
        if adapter_names is None:
            self._ranks_ready(adapter_names)
            return self._call_without_names(self.model, *args, **kwargs)
        with self._batch(adapter_names, self._batch_size(args, kwargs)):
            return self.model(*args, **kwargs)

    def _train_call(self, args, kwargs, adapter_names):
        if adapter_names is None:  # the base model alone: nothing of lora_ext's to train
            self._ranks_ready(adapter_names)
            self.recompute_batch = None
            return self.model(*args, **kwargs)
        batch, error = None, None
        try:
            names = self._row_names(adapter_names, self._batch_size(args, kwargs))
            fixed = (self.max_adapters, self.max_rank, list(self.layers.values())) if self._compiled else None
            batch = TrainBatch(self, names, self.store, self._device(), fixed_shape=fixed)
        except Exception as e:  # under tensor parallelism every rank must learn of it (_ranks_ready)
            error = e
        self._ranks_ready(adapter_names, error)
        self.recompute_batch = batch  # layers recomputed during backward see the same rows
        with active_batch(batch):
            return self.model(*args, **kwargs)

    def compile(self, **kwargs):
        """Compiles the wrapped model in place with torch.compile (nn.Module.compile; kwargs go to
        torch.compile). Training batches then give the compiled graph every layer's adapter
        weights already stacked in one shape (max_adapters x max_rank), so a new mix of adapters
        in a batch does not recompile it. Returns self."""
        self._check_patched()
        self.model.compile(**kwargs)
        self._compiled = True
        return self

    def generate(self, *args, adapter_names=None, **kwargs):
        """model.generate with one adapter per input row; beams and returned sequences of a row use
        that row's adapter."""
        self._check_patched()
        if adapter_names is None:
            self._ranks_ready(adapter_names)
            return self._call_without_names(self.model.generate, *args, **kwargs)
        with self._batch(adapter_names, self._batch_size(args, kwargs)):
            return self.model.generate(*args, **kwargs)

    def prefetch(self, names):
        """Brings adapters into device slots ahead of the batches that will name them."""
        self._check_patched()
        names = list(dict.fromkeys(n for n in names if n not in (None, BASE_ADAPTER)))
        self.store.require(names)
        self.store.release(self.store.acquire(names))

    @contextmanager
    def _batch(self, adapter_names, batch_size):
        slots, error = {}, None
        try:
            names = self._row_names(adapter_names, batch_size)
            distinct = list(dict.fromkeys(n for n in names if n is not None))
            slots = self.store.acquire(distinct)
            self.store.wait_for_copies(slots.values())
            row_slots = torch.tensor([slots[n] if n is not None else -1 for n in names], dtype=torch.long,
                                     device=self._device())
            rows = BatchRows(self, row_slots, self.max_adapters, any_adapter=bool(distinct),
                             slots=frozenset(slots.values()))
        except Exception as e:  # under tensor parallelism every rank must learn of it (_ranks_ready)
            error = e
        try:
            self._ranks_ready(adapter_names, error)
            with torch.no_grad(), active_batch(rows):
                yield
        finally:
            if slots:
                self.store.release(slots)

    def _row_names(self, adapter_names, batch_size):
        if isinstance(adapter_names, str) or not hasattr(adapter_names, "__len__"):
            raise ValueError(f"lora_ext: adapter_names must be a list with one name per batch row, not "
                             f"{type(adapter_names).__name__}")
        if batch_size is not None and len(adapter_names) != batch_size:
            raise ValueError(f"lora_ext: adapter_names has {len(adapter_names)} entries but the batch has "
                             f"{batch_size} rows")
        names = [None if n in (None, BASE_ADAPTER) else n for n in adapter_names]
        self.store.require(n for n in names if n is not None)
        with self._lock:
            if self._merged is not None:
                others = sorted({str(n) if n is not None else BASE_ADAPTER for n in names if n != self._merged})
                if others:
                    raise ValueError(f"lora_ext: adapter {self._merged!r} is merged into the base weights, so rows "
                                     f"asking for {others} cannot be served; unmerge_adapter() first")
                return [None] * len(names)  # the merged weights already hold this adapter
        return names

    # ---- merging and unpatching ----------------------------------------------------------------

    def merge_adapter(self, name):
        """Folds `name` into the base weights (single-tenant speed); unmerge_adapter() restores them
        bitwise. While merged, batches may only name that adapter (or no adapter_names at all)."""
        self._check_patched()
        with self._lock:
            try:
                merged_weights, weights = self._merged_weights(name)
            except Exception as e:  # under tensor parallelism every rank must learn of it (_ranks_ready)
                self._ranks_ready(["merge_adapter", name], e)
            self._ranks_ready(["merge_adapter", name])  # all ranks merge, or none
            for module, copy in weights.saved.items():
                self.saved_layers[module].merge(copy)
            for module, (new_weight, new_bias) in merged_weights.items():
                layer = self.layers[module]
                base, bias = layer.local_weight(), layer.local_bias()
                layer.merge_backup = (base.detach().clone(), None if bias is None else bias.detach().clone())
                self._merge_backup[module] = layer.merge_backup
                with torch.no_grad():
                    base.copy_(new_weight)
                    if new_bias is not None:
                        bias.copy_(new_bias)
            self._merged = name
        logger.info("merged adapter %r into %d modules", name, len(weights.modules))

    def _merged_weights(self, name):
        """({module: (new weight, new bias or None)} in the base's dtypes, the adapter's slot
        weights), checked finite; nothing written yet."""
        if self._merged is not None:
            raise ValueError(f"lora_ext: adapter {self._merged!r} is already merged; unmerge_adapter() first")
        weights = self.store.slot_weights(name)
        merged_weights = {}
        for module, module_weights in weights.modules.items():
            layer = self.layers[module]
            base = layer.local_weight()
            new_weight, new_bias = layer.merged(module_weights, f"adapter {name!r}: module {module!r}")
            for what, new, dtype in (("weight", new_weight, base.dtype), ("bias", new_bias, base.dtype)):
                if new is not None and not torch.isfinite(new.to(dtype)).all():
                    raise AdapterError(f"adapter {name!r}: merging into module {module!r} overflows its "
                                       f"{what} in {dtype}")
            merged_weights[module] = (new_weight.to(base.dtype),
                                      None if new_bias is None else new_bias.to(layer.base_layer.bias.dtype))
        return merged_weights, weights

    def unmerge_adapter(self):
        """Restores the base weights exactly as they were before merge_adapter()."""
        with self._lock:
            if self._merged is None:
                raise ValueError("lora_ext: no adapter is merged")
            for module, (weight, bias) in self._merge_backup.items():
                layer = self.layers[module]
                with torch.no_grad():
                    layer.local_weight().copy_(weight)
                    if bias is not None:
                        layer.local_bias().copy_(bias)
                layer.merge_backup = None
            self._merge_backup.clear()
            for layer in self.saved_layers.values():
                if layer.merged is not None:
                    layer.unmerge()
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
            self.saved_layers.clear()
        return self.model

    # ---- internals -----------------------------------------------------------------------------

    def _check_patched(self):
        if not self._patched:
            raise RuntimeError("lora_ext: this MultiLoraModel was unpatched; patch the model again to use adapters")

    def _device(self):
        return next(iter(self.layers.values())).device

    def _ranks_ready(self, adapter_names, error=None):
        """Raises `error` (this process's failure to prepare the batch, or None). Under tensor
        parallelism first one small all-reduce per call (not per layer) tells every rank whether
        all were given the same adapter names and all prepared the batch, so that all raise
        together or all run it: a rank that ran alone would wait for the others forever."""
        if self._tp_group is not None:
            names = None if adapter_names is None or isinstance(adapter_names, str) else [
                n if isinstance(n, str) or n is None else repr(n) for n in adapter_names]
            check_same_batch(self._tp_group, names, self._device(), failed=error is not None)
        if error is not None:
            raise error

    def _call_without_names(self, fn, *args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    @staticmethod
    def _batch_size(args, kwargs):
        for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                return value.shape[0]
        return None


def find_saved_modules(model, modules_to_save, lora_targets):
    """Module names matching `modules_to_save` (PEFT's semantics: a name or a name suffix), none of
    them a LoRA target."""
    if not modules_to_save:
        return []
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    names = [n for n, _ in model.named_modules() if n and names_module(modules_to_save, n)]
    missing = [m for m in modules_to_save if not any(names_module([m], n) for n in names)]
    if missing:
        raise ValueError(f"lora_ext: modules_to_save={list(modules_to_save)!r}: no module of {type(model).__name__} "
                         f"is named {missing}")
    both = sorted(set(names) & set(lora_targets))
    if both:
        raise ValueError(f"lora_ext: {both} are both LoRA targets and modules_to_save; take them out of target_modules")
    return names


def _one_group(shardings):
    """The process group of the tensor-parallel layers (None without any); they must share one."""
    groups = {id(s.group): s.group for s in shardings.values() if s is not None}
    if len(groups) > 1:
        raise ValueError(f"lora_ext: the patched layers are sharded over {len(groups)} different process groups; "
                         "lora_ext supports one tensor-parallel group per model")
    return next(iter(groups.values()), None)


def patch_model(model, target_modules="all-linear", max_adapters=8, max_rank=64, host_cache_bytes=None,
                slot_timeout=DEFAULT_SLOT_TIMEOUT, modules_to_save=None):
    """Patches `model` in place so every batch row can use its own LoRA adapter.

    Args:
        model: a transformers model (or any torch module with Linear / Conv1D layers).
        target_modules: "all-linear" (every linear layer but the output head), a regex matched
            against full module names, or a list of module name suffixes (PEFT's semantics).
        max_adapters: device slots per patched layer (adapters usable in one batch).
        max_rank: the largest adapter rank a slot holds.
        host_cache_bytes: budget of validated adapter weights kept in host memory (None: no limit).
        slot_timeout: seconds a batch (or prefetch) waits for device slots that running batches
            hold before it raises SlotTimeoutError.
        modules_to_save: modules (names or name suffixes, e.g. ["lm_head"]) of which adapters may
            carry their own full copy (PEFT's modules_to_save); max_adapters copies of each are
            preallocated, and an adapter carrying a copy of any other module is refused.
    Returns:
        MultiLoraModel
    """
    return MultiLoraModel(model, target_modules, max_adapters, max_rank, host_cache_bytes, slot_timeout, modules_to_save)
