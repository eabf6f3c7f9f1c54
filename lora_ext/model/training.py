"""Training many adapters at once on one patched model (the part of MultiLoraModel that trains).

    mm.add_adapter("sql", peft.LoraConfig(r=16, lora_alpha=32, target_modules=[...]))
    mm.load_adapter("chat", path, trainable=True)
    opt = torch.optim.AdamW(mm.adapter_parameters("sql") + mm.adapter_parameters("chat"))
    mm.train(); out = mm(input_ids=ids, adapter_names=names); loss.backward(); opt.step()
    mm.eval(); mm.save_adapter("sql", out_dir)

Each row's gradient reaches only its own adapter (the grouped backward kernels sum each slot's rows
only); an adapter with no row in a step gets no gradient (its .grad stays None, so an optimizer
leaves it untouched); the base model is frozen.
"""

import enum

import torch

from lora_ext.adapters.config import AdapterError, parse_config
from lora_ext.adapters.peft_format import read_peft_adapter
from lora_ext.adapters.peft_writer import save_peft_adapter
from lora_ext.adapters.trainable import TrainableAdapter, TrainableModule, adapter_from_weights, new_adapter
from lora_ext.model.targets import modules_targeted_by


def config_fields(config):
    """A peft.LoraConfig or a dict as plain JSON-like fields (enums as their values, sets as sorted
    lists), for the one config validator (lora_ext/adapters/config.py)."""
    fields = config.to_dict() if hasattr(config, "to_dict") else config
    if not isinstance(fields, dict):
        raise AdapterError(f"an adapter config must be a peft.LoraConfig or a dict, not {type(config).__name__}")

    def plain(value):
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        return value
    return {k: plain(v) for k, v in fields.items()}


def _refuse_untrainable(name, config):
    """Adapters lora_ext serves but does not train yet."""
    if config.use_dora and config.lora_dropout:
        raise AdapterError(f"adapter {name!r}: training DoRA with lora_dropout={config.lora_dropout:g} is not "
                           "implemented yet (PEFT then recomputes the base output from the dropped input)")


class TrainingMixin:
    """add_adapter, trainable load_adapter, adapter_parameters, train / eval, save_adapter."""

    training = False
    recompute_batch = None  # the last training batch, for layers recomputed during backward

    def add_adapter(self, name, config, *, generator=None):
        """Creates a trainable adapter from a peft.LoraConfig or a dict of its fields (r, lora_alpha,
        target_modules, exclude_modules, rank_pattern, alpha_pattern, use_rslora, lora_dropout,
        layers_to_transform, layers_pattern, init_lora_weights: True, "gaussian" or False), initialised
        as PEFT initialises it (`generator` for its random draws). Anything PEFT would compute
        differently and lora_ext does not implement is refused with an AdapterError."""
        self._check_patched()
        self._check_new_name(name)
        parsed = parse_config(name, config_fields(config), "the config given to add_adapter")
        _refuse_untrainable(name, parsed)
        modules = modules_targeted_by(parsed, list(self.layers))
        if parsed.target_modules == "all-linear":  # PEFT's all-linear leaves embeddings out
            modules = [m for m in modules if not self.layers[m].is_embedding]
        if not modules:
            raise AdapterError(f"adapter {name!r}: target_modules={parsed.target_modules!r} targets none of the "
                               f"patched modules (they look like {sorted(self.layers)[:3]})")
        self.store.register_trainable(new_adapter(name, parsed, modules, self.layers, self.max_rank, generator,
                                                  self.saved_layers))

    def _load_trainable(self, name, path, allow_pickle):
        adapter = read_peft_adapter(name, path, allow_pickle=allow_pickle, max_rank=self.max_rank,
                                    modules={m: layer.full_shape for m, layer in self.layers.items()},
                                    saved_modules={m: layer.shapes for m, layer in self.saved_layers.items()})
        _refuse_untrainable(name, adapter.config)
        self.store.register_trainable(adapter_from_weights(name, adapter.config, adapter.modules, self.layers,
                                                           adapter.saved, self.saved_layers), path)

    def adapter_parameters(self, name):
        """The trainable adapter's leaf tensors (lora_A and lora_B of each module, float32), for any
        torch.optim optimizer."""
        trainable = self.store.trainable(name)
        if trainable is None:
            raise AdapterError(f"adapter {name!r} is not trainable: load it with load_adapter(..., trainable=True) "
                               "or create it with add_adapter")
        return trainable.parameters()

    def train(self, mode=True):
        """Training mode: batches record autograd through the adapters (the base model is frozen:
        its parameters stop requiring grad), and the wrapped model's dropout and checkpointing
        behave as in training. Returns self."""
        self._check_patched()
        if mode and self._merged is not None:
            raise ValueError(f"lora_ext: adapter {self._merged!r} is merged into the base weights; "
                             "unmerge_adapter() before training")
        self.training = bool(mode)
        self.model.train(self.training)
        if self.training:
            for parameter in self.model.parameters():
                parameter.requires_grad_(False)
        else:
            self.recompute_batch = None
        return self

    def eval(self):
        """Serving mode (the default): batches run without autograd; trained adapters serve their
        current weights."""
        return self.train(False)

    def save_adapter(self, name, directory, *, overwrite=False):
        """Writes a trainable adapter as a PEFT directory (adapter_config.json and
        adapter_model.safetensors, PEFT's key names) that PeftModel.from_pretrained and load_adapter
        both read. Atomic; an existing directory is replaced only with overwrite=True."""
        trainable = self.store.trainable(name)
        if trainable is None:
            raise AdapterError(f"adapter {name!r} is not trainable, so lora_ext has no weights of its own to save; "
                               f"its files are in {self.store.record(name).path!r}")
        model_config = getattr(self.model, "config", None)
        conv1d = any(self.layers[m].is_conv1d for m in trainable.modules)
        task = "CAUSAL_LM" if hasattr(self.model, "generate") and hasattr(self.model, "get_output_embeddings") else None

        embeddings = {m for m in trainable.modules if self.layers[m].is_embedding}

        def save(adapter):
            save_peft_adapter(adapter, directory, overwrite=overwrite, embedding_modules=embeddings, task_type=task,
                              fan_in_fan_out=conv1d,
                              base_model_name_or_path=getattr(model_config, "_name_or_path", None) or None)
        if self._tp_group is None:
            return save(trainable)
        # tensor parallelism: every rank's part is gathered, rank 0 writes, every rank sees its error
        whole = TrainableAdapter(trainable.name, trainable.config, {
            m: TrainableModule(*self._gather_module(m, w), w.rank, w.scaling, w.lora_bias, w.magnitude)
            for m, w in trainable.modules.items()}, trainable.dropout, trainable.saved)
        error, failure = [None], None
        if torch.distributed.get_rank(self._tp_group) == 0:
            try:
                save(whole)
            except Exception as e:  # every rank must reach the broadcast below
                error, failure = [f"{type(e).__name__}: {e}"], e
        source = torch.distributed.get_global_rank(self._tp_group, 0)
        torch.distributed.broadcast_object_list(error, src=source, group=self._tp_group)
        if failure is not None:
            raise failure
        if error[0] is not None:
            raise AdapterError(f"adapter {name!r}: rank 0 could not save it: {error[0]}")

    def _gather_module(self, module, weights):
        sharding = self.layers[module].sharding
        if sharding is None:
            return weights.lora_a.detach(), weights.lora_b.detach()
        return sharding.gather(weights.lora_a, weights.lora_b)

    def nonfinite_gradients(self):
        """Names of trainable adapters whose gradients hold NaN or infinity (their rows' loss was
        not finite); every other adapter's gradients are unaffected."""
        bad = []
        for name in self.store.trainable_names():
            grads = [p.grad for p in self.store.trainable(name).parameters() if p.grad is not None]
            if any(not torch.isfinite(g).all() for g in grads):
                bad.append(name)
        return bad
