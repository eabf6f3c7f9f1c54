"""Reads and validates a PEFT LoRA adapter directory, without any model.

A directory holds adapter_config.json and adapter_model.safetensors (or the legacy pickle
adapter_model.bin, read only when the caller opts in, and then with weights_only=True). Both are
untrusted: the config becomes a validated AdapterConfig (config.py) before anything reads it, and
the safetensors header is read and checked here (sizes, byte ranges inside the file and apart,
floating dtypes, LoRA A/B keys only; with the caller's `modules` and `max_rank`, also that every
module is patched, fits its layer and stays within max_rank) before any tensor is read. Each
targeted module gets its rank and scaling exactly as PEFT computes them: rank_pattern and
alpha_pattern (first matching key wins), rsLoRA (alpha / sqrt(r)) or plain LoRA (alpha / r).
Everything that changes the math and is not implemented is refused, never ignored.
"""

import math
import os
import re
from dataclasses import dataclass, field

import torch

from lora_ext.adapters.config import (CONFIG_FILE, AdapterConfig, AdapterError, module_scaling,  # noqa: F401
                                      clip, names_module, open_regular_file, parse_json, pattern_value, read_config,
                                      refuse_unsupported_config, short)

SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
MAX_HEADER_BYTES = 100 << 20
# lora_A / lora_B weights (lora_embedding_A / _B on an embedding), lora_B's bias (lora_bias=True),
# DoRA's magnitude vector, and the copy of an embedding's base weight that PEFT saves with an
# embedding adapter (save_embedding_layers); an optional adapter-name segment (".default") as PEFT's
# in-memory state dicts have
_KEYS = {
    "A": re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?:lora_A(?:\.[^.]+)?\.weight"
                    r"|lora_embedding_A(?:\.[^.]+)?)$"),
    "B": re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?:lora_B(?:\.[^.]+)?\.weight"
                    r"|lora_embedding_B(?:\.[^.]+)?)$"),
    "base_copy": re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.base_layer\.weight$"),
    "bias": re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_B(?:\.[^.]+)?\.bias$"),
    "magnitude": re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_magnitude_vector(?:\.[^.]+)?"
                            r"(?:\.weight)?$"),
}
# safetensors dtype -> (bytes per element, torch dtype of the floating ones lora_ext reads)
_DTYPES = {"F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16),
           "BF16": (2, torch.bfloat16), "F8_E4M3": (1, torch.float8_e4m3fn), "F8_E5M2": (1, torch.float8_e5m2),
           "F8_E8M0": (1, None), "BOOL": (1, None), "U8": (1, None), "I8": (1, None), "I16": (2, None),
           "U16": (2, None), "I32": (4, None), "U32": (4, None), "I64": (8, None), "U64": (8, None)}


@dataclass
class ModuleWeights:
    """One module's LoRA: lora_a (rank, d_in) and lora_b (d_out, rank), as PEFT stores them; with
    lora_bias=True, lora_B's bias (d_out,); with DoRA, the magnitude vector m (d_out,)."""

    module: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    rank: int
    scaling: float
    lora_bias: torch.Tensor = None
    magnitude: torch.Tensor = None
    base_copy: torch.Tensor = None  # the base weight as saved with the adapter (checked, not kept)

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.lora_a, self.lora_b, self.lora_bias, self.magnitude)
                   if t is not None)


@dataclass
class PeftAdapter:
    name: str
    path: str
    config: AdapterConfig
    modules: dict  # module name in the base model -> ModuleWeights
    saved: dict = field(default_factory=dict)  # modules_to_save: module name -> {"weight": t, "bias": t}

    @property
    def nbytes(self):
        return sum(m.nbytes for m in self.modules.values()) + sum(
            t.numel() * t.element_size() for params in self.saved.values() for t in params.values())


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the file declares it: dtype (name, and the torch dtype if floating), shape
    and, for safetensors, its absolute byte range in the file."""

    dtype: str
    torch_dtype: object
    shape: tuple
    begin: int = 0
    end: int = 0


def read_peft_adapter(name, path, *, allow_pickle=False, modules=None, max_rank=None, saved_modules=None):
    """Reads and validates the adapter directory `path`; raises AdapterError on anything refused.

    modules: optional {module name: (d_in, d_out)} of the patched layers; weights of any other
    module, or of a shape that does not fit, are refused. max_rank: optional largest rank.
    saved_modules: optional {module name: {"weight": shape, "bias": shape or None}} of the modules
    whose per-adapter copies (modules_to_save) the model serves; a copy of any other module, or
    of another shape, is refused. All are checked from the file's header, before any tensor is read."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise AdapterError(f"adapter {name!r}: {path!r} is not a directory")
    config = read_config(name, path)
    file, f, entries, tensors = open_weights(name, path, allow_pickle)
    with f:
        saved_keys = plan_saved_modules(name, file, entries, config, saved_modules)
        copies = {k for keys in saved_keys.values() for k in keys.values()}
        lora_entries = {k: e for k, e in entries.items() if k not in copies}
        plan = plan_modules(name, file, lora_entries, config, modules, max_rank, allow_none=bool(saved_keys))
        check_layers_to_transform(name, config, plan, modules)
        weights = {}
        for module, (keys, rank) in plan.items():
            read = {which: tensors[k] if tensors is not None else read_tensor_bytes(name, file, f, k, entries[k])
                    for which, k in keys.items()}
            weights[module] = check_module(name, module, read, rank, config)
        saved = {}
        for module, keys in saved_keys.items():
            saved[module] = {which: _finite(name, module, which, tensors[k] if tensors is not None
                                            else read_tensor_bytes(name, file, f, k, entries[k]))
                             for which, k in keys.items()}
    return PeftAdapter(name=name, path=path, config=config, modules=weights, saved=saved)


def open_weights(name, path, allow_pickle):
    """(file, open file object, {key: TensorEntry}, tensors or None): the safetensors file with its
    checked header (tensors None: read later, only those needed), or the pickle, loaded."""
    safetensors_file = os.path.join(path, SAFETENSORS_FILE)
    pickle_file = os.path.join(path, PICKLE_FILE)
    if os.path.lexists(safetensors_file):
        f, size = open_regular_file(name, safetensors_file)
        try:
            return safetensors_file, f, read_safetensors_header(name, safetensors_file, f, size), None
        except BaseException:
            f.close()
            raise
    if not os.path.lexists(pickle_file):
        raise AdapterError(f"adapter {name!r}: {path} has neither {SAFETENSORS_FILE} nor {PICKLE_FILE}")
    if not allow_pickle:
        raise AdapterError(f"adapter {name!r}: {path} holds only {PICKLE_FILE}, a pickle, which can run code "
                           "when loaded; pass allow_pickle=True to load it with torch.load(weights_only=True)")
    f, _ = open_regular_file(name, pickle_file)
    try:
        tensors = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:
        f.close()
        raise AdapterError(f"adapter {name!r}: {pickle_file} cannot be loaded with weights_only=True: {exc}") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        f.close()
        raise AdapterError(f"adapter {name!r}: {pickle_file} must hold a dict of tensors")
    entries = {k: TensorEntry(str(v.dtype), v.dtype if v.is_floating_point() else None, tuple(v.shape))
               for k, v in tensors.items()}
    return pickle_file, f, entries, tensors


def read_safetensors_header(name, file, f, size):
    """{key: TensorEntry} from the header of the open safetensors file `f` of `size` bytes: an
    8-byte little-endian length, then that many bytes of JSON; every declared range checked."""
    corrupt = f"adapter {name!r}: {file} is corrupt or truncated"
    if size < 8:
        raise AdapterError(f"{corrupt}: {size} bytes, less than the 8-byte header length")
    length = int.from_bytes(f.read(8), "little")
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise AdapterError(f"{corrupt}: header length {length} is more than the {size - 8} bytes after it "
                           f"or the limit of {MAX_HEADER_BYTES}")
    raw = f.read(length)
    if len(raw) != length:
        raise AdapterError(f"{corrupt}: header of {length} bytes, only {len(raw)} read")
    header = parse_json(raw, f"{corrupt}: its header cannot be read as JSON")
    if not isinstance(header, dict):
        raise AdapterError(f"{corrupt}: its header must be a JSON object, not {type(header).__name__}")
    data_start, entries = 8 + length, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        where = f"{corrupt}: tensor {short(key)}"
        if not isinstance(info, dict):
            raise AdapterError(f"{where} must be described by an object, not {short(info)}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise AdapterError(f"{where} has dtype {short(dtype)}, not one of {', '.join(_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
            raise AdapterError(f"{where} has shape {short(shape)}, not a list of integers >= 0")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise AdapterError(f"{where} has data_offsets {short(offsets)}, not [begin, end] with 0 <= begin <= end")
        if data_start + offsets[1] > size:
            raise AdapterError(f"{where}: data_offsets {offsets} lie outside the file ({size - data_start} data "
                               "bytes)")
        nbytes = math.prod(shape) * _DTYPES[dtype][0]
        if offsets[1] - offsets[0] != nbytes:
            raise AdapterError(f"{where}: shape {shape} of {dtype} is {nbytes} bytes, but data_offsets {offsets} "
                               f"span {offsets[1] - offsets[0]}")
        entries[key] = TensorEntry(dtype, _DTYPES[dtype][1], tuple(shape), data_start + offsets[0],
                                   data_start + offsets[1])
    spans = sorted((e.begin, e.end, k) for k, e in entries.items() if e.end > e.begin)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise AdapterError(f"{corrupt}: tensors {short(first)} and {short(second)} overlap "
                               f"(bytes {entries[first].begin}..{end} and {begin}..{entries[second].end})")
    return entries


def _is_index(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_tensor_bytes(name, file, f, key, entry):
    """The tensor `key` read from its checked byte range of the open safetensors file."""
    data = bytearray(entry.end - entry.begin)
    f.seek(entry.begin)
    if f.readinto(data) != len(data):  # the file shrank after its header was checked
        raise AdapterError(f"adapter {name!r}: {file} is corrupt or truncated: tensor {short(key)} could not be "
                           "read in full")
    if not data:
        return torch.empty(entry.shape, dtype=entry.torch_dtype)
    return torch.frombuffer(data, dtype=entry.torch_dtype).reshape(entry.shape)  # safetensors is little-endian


def plan_saved_modules(name, file, entries, config, saved_modules):
    """{module: {"weight": key, "bias": key}} of the full module copies in the file (PEFT's
    modules_to_save, saved as <module>.weight / .bias), checked against `saved_modules` (the
    model's) from the header."""
    if not config.modules_to_save:
        return {}
    found = {}
    for key, entry in entries.items():
        match = re.match(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<which>weight|bias)$", key)
        if match is None or ".lora_" in key or ".base_layer." in key:
            continue
        module = match["module"]
        if names_module(config.modules_to_save, module):
            found.setdefault(module, {})[match["which"]] = key
    for module, keys in sorted(found.items()):
        where = f"adapter {name!r}: {file}: modules_to_save module {module!r}"
        if saved_modules is not None and module not in saved_modules:
            raise AdapterError(f"{where}: the model serves no copies of it (patch_model(..., modules_to_save=[...]) "
                               f"lists {sorted(saved_modules)})")
        if "weight" not in keys:
            raise AdapterError(f"{where} has a bias but no weight")
        for which, key in keys.items():
            entry = entries[key]
            expected = None if saved_modules is None else saved_modules[module].get(which)
            if entry.torch_dtype is None:
                raise AdapterError(f"{where}: {which} must be floating point, not {entry.dtype}")
            if saved_modules is not None and entry.shape != expected:
                raise AdapterError(f"{where}: {which} has shape {entry.shape}, but the model's is {expected}")
        if saved_modules is not None and saved_modules[module].get("bias") is not None and "bias" not in keys:
            raise AdapterError(f"{where} has no bias, but the model's module has one")
    return found


def _nonfinite(tensor):
    """How many NaN or infinite values `tensor` holds (float8 has no isfinite of its own)."""
    return int((~torch.isfinite(tensor if tensor.element_size() > 1 else tensor.float())).sum())


def _finite(name, module, which, tensor):
    bad = _nonfinite(tensor)
    if bad:
        raise AdapterError(f"adapter {name!r}: modules_to_save module {module!r}: {which} holds {bad} NaN or "
                           "infinite values")
    return tensor


def plan_modules(name, file, entries, config, modules=None, max_rank=None, allow_none=False):
    """{module: ({"A": key, "B": key, and "bias" / "magnitude" when present}, rank)} from the
    declared keys, dtypes and shapes alone."""
    halves, refused = {}, []
    for key in entries:
        match = next(((which, m) for which, pattern in _KEYS.items() if (m := pattern.match(key))), None)
        if match is None:
            refused.append(key)
            continue
        halves.setdefault(match[1]["module"], {}).setdefault(match[0], []).append(key)
    if refused:
        kinds = sorted({_describe_key(k) for k in refused})
        raise AdapterError(f"adapter {name!r}: {file}: unsupported weights {[clip(k) for k in refused[:5]]}"
                           f"{' ...' if len(refused) > 5 else ''} ({', '.join(kinds)})")
    if not halves and not allow_none:
        raise AdapterError(f"adapter {name!r}: {os.path.dirname(file)} holds no lora_A / lora_B weights")
    if modules is not None:
        unknown = sorted(m for m in halves if m not in modules)
        if unknown:
            raise AdapterError(f"adapter {name!r}: {file}: weights for modules that are not patched: "
                               f"{[clip(m) for m in unknown[:5]]}{' ...' if len(unknown) > 5 else ''} "
                               f"({len(unknown)} of {len(halves)}); patched modules look like {sorted(modules)[:3]}")
    plan = {}
    for module, pair in sorted(halves.items()):
        problem = (_module_problem(pair, entries, config.rank(module), (modules or {}).get(module), max_rank)
                   or _extras_problem(pair, entries, config))
        if problem:
            raise AdapterError(f"adapter {name!r}: module {module!r}{problem} ({file})")
        plan[module] = ({which: keys[0] for which, keys in pair.items()}, config.rank(module))
    return plan


def _module_problem(pair, entries, rank, layer, max_rank):
    """What is wrong with one module's declared weights ('' if nothing): pairing, shapes, dtypes,
    its layer's (d_in, d_out) if given, max_rank if given and the config's rank."""
    if not {"A", "B"} <= set(pair):
        return (" has lora_A but no lora_B" if "A" in pair else " has lora_B but no lora_A" if "B" in pair
                else f" has {' and '.join(_NAMES[w] for w in sorted(pair))} but no lora_A / lora_B weights")
    for which, keys in sorted(pair.items()):
        if len(keys) > 1:
            return f" has {len(keys)} {_NAMES[which]} tensors: {[clip(k) for k in keys[:3]]}"
    a, b = entries[pair["A"][0]], entries[pair["B"][0]]
    if len(a.shape) != 2 or len(b.shape) != 2:
        return f": lora_A {a.shape} and lora_B {b.shape} must be 2-D"
    if a.shape[0] != b.shape[1]:
        return f": lora_A has rank {a.shape[0]} (shape {a.shape}) but lora_B has rank {b.shape[1]} (shape {b.shape})"
    if a.torch_dtype is None or b.torch_dtype is None:
        return f": weights must be floating point, not {a.dtype} / {b.dtype} ({pair['A'][0]}, {pair['B'][0]})"
    if layer is not None and (a.shape[1], b.shape[0]) != tuple(layer):
        return f": lora_A {a.shape} and lora_B {b.shape} do not fit the layer ({layer[0]} -> {layer[1]})"
    if max_rank is not None and a.shape[0] > max_rank:
        return f": rank {a.shape[0]} exceeds max_rank={max_rank}"
    if a.shape[0] != rank:
        return f": weights have rank {a.shape[0]} but the config gives rank {short(rank)} (r / rank_pattern)"
    return ""


_NAMES = {"A": "lora_A", "B": "lora_B", "bias": "lora_B bias", "magnitude": "lora_magnitude_vector",
          "base_copy": "base_layer weight"}


def _extras_problem(pair, entries, config):
    """What is wrong with a module's lora_B bias or DoRA magnitude ('' if nothing): present
    exactly when the config says so (lora_bias, use_dora), 1-D floating, one value per output."""
    d_out = entries[pair["B"][0]].shape[0]
    for which, wanted, flag in (("bias", config.lora_bias, "lora_bias"), ("magnitude", config.use_dora, "use_dora")):
        if which in pair and not wanted:
            return f" has a {_NAMES[which]} ({clip(pair[which][0])}) but the config has {flag}=false"
        if which not in pair and wanted:
            return f" has no {_NAMES[which]} but the config has {flag}=true"
        if which in pair:
            entry = entries[pair[which][0]]
            if entry.torch_dtype is None:
                return f": {_NAMES[which]} must be floating point, not {entry.dtype}"
            if entry.shape != (d_out,):
                return f": {_NAMES[which]} has shape {entry.shape}, not ({d_out},) (one value per output of lora_B)"
    if "base_copy" in pair:
        entry, d_in = entries[pair["base_copy"][0]], entries[pair["A"][0]].shape[1]
        if entry.torch_dtype is None or len(entry.shape) != 2 or sorted(entry.shape) != sorted((d_in, d_out)):
            return f": base_layer weight {entry.dtype} {entry.shape} does not fit lora_A / lora_B ({d_in} -> {d_out})"
    return ""


def _describe_key(key):
    if key.endswith(".bias"):
        return "biases other than lora_B's are not supported"
    if "modules_to_save" in key:
        return "modules_to_save is not supported"
    return "not LoRA A/B weights"


def check_module(name, module, read, rank, config):
    """ModuleWeights of one planned module from its tensors read ({"A", "B", and "bias" /
    "magnitude" when present}): finite values, scaling."""
    where = f"adapter {name!r}: module {module!r}"
    for which, tensor in read.items():
        bad = _nonfinite(tensor)
        if bad:
            raise AdapterError(f"{where}: {_NAMES[which]} holds {bad} NaN or infinite values")
    return ModuleWeights(module, read["A"], read["B"], rank, config.scaling(module), lora_bias=read.get("bias"),
                         magnitude=read.get("magnitude"), base_copy=read.get("base_copy"))


def layer_index(module, layers_pattern):
    patterns = layers_pattern if isinstance(layers_pattern, (list, tuple)) else [layers_pattern] if layers_pattern else []
    for pattern in patterns or [r"[^.]+"]:
        match = re.match(rf".*\.{pattern}\.(\d+)\.", module)
        if match:
            return int(match.group(1))
    return None


def check_layers_to_transform(name, config, modules, patched=None):
    """Weights outside layers_to_transform mean the file and its config disagree; with the patched
    modules known, layers_to_transform must name layers the model has."""
    if config.layers_to_transform is None:
        return
    allowed = set(config.layers_to_transform)
    if patched is not None:
        present = {layer_index(m, config.layers_pattern) for m in patched} - {None}
        absent = sorted(allowed - present)
        if present and absent:
            raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} field 'layers_to_transform' names layers {absent} "
                               f"that the model's patched modules do not have (they are in layers "
                               f"{min(present)}-{max(present)})")
    for module in modules:
        index = layer_index(module, config.layers_pattern)
        if index is not None and index not in allowed:
            raise AdapterError(f"adapter {name!r}: module {module!r} is in layer {index}, but layers_to_transform "
                               f"is {sorted(allowed)}")
