"""adapter_config.json as one typed, validated structure (AdapterConfig), and the limits lora_ext
applies to every adapter file it reads (they come from users, so they are untrusted input).

Every field of PEFT's LoraConfig that lora_ext reads or must refuse has its type checked: booleans
are real booleans, ranks positive integers, alphas finite positive numbers, regexes compile (the
rank_pattern / alpha_pattern keys as PEFT matches them, re.match(rf"(.*\\.)?({key})$", name)).
Unknown keys are ignored, as PEFT ignores them. Features that change the math and are not
implemented are refused by name. Every failure is an AdapterError naming the adapter, the file,
the field and the value.
"""

import json
import math
import os
import re
import stat
from dataclasses import dataclass, field

CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20  # real configs are a few KiB
MAX_JSON_DEPTH = 64         # real configs nest 3 deep; json recurses once per level
_INIT_THAT_CHANGES_THE_BASE = ("pissa", "olora", "corda")


class AdapterError(ValueError):
    """An adapter that lora_ext refuses; the message names the adapter, the file or module and the values."""


def clip(text, limit=80):
    """`text` cut to `limit` characters (values come from untrusted files)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def short(value, limit=80):
    """repr(value), cut to `limit` characters."""
    return clip(repr(value), limit)


# ---- untrusted files ------------------------------------------------------------------------------

def open_regular_file(name, file):
    """(binary file object, size) of `file` if it is a regular file (a symlink to one is fine).
    Opened non-blocking and checked with fstat on the open descriptor, so a FIFO or a device never
    blocks and cannot be swapped in after the check. FileNotFoundError passes through."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(file, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise AdapterError(f"adapter {name!r}: {file} cannot be opened: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket or other special file")
            raise AdapterError(f"adapter {name!r}: {file} is not a regular file (it is {kind})")
        return os.fdopen(fd, "rb"), os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        raise


def read_limited(name, file, f, size, limit):
    """At most `limit` bytes of the open file `f` of `size` bytes, refusing a larger file."""
    if size > limit:
        raise AdapterError(f"adapter {name!r}: {file} is {size} bytes, more than the limit of {limit} bytes")
    data = f.read(limit + 1)
    if len(data) > limit:  # it grew after fstat
        raise AdapterError(f"adapter {name!r}: {file} is more than the limit of {limit} bytes")
    return data


_ESCAPE = re.compile(r"\\.", re.S)
_STRING = re.compile(r'"[^"]*"?')  # once escapes are gone; an unterminated string runs to the end
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_EMPTY_PAIR = re.compile(r"\[\]|\{\}")


def json_depth_bound(text, limit=MAX_JSON_DEPTH):
    """An upper bound on how deep json.loads would recurse into `text`, exact for valid JSON, and
    computed without recursion in linear passes: escapes, then strings removed (up to where the
    decoder would fail, it splits the text the same way), then innermost bracket pairs stripped
    one level per pass; what cannot be stripped (malformed text) counts each opening bracket as a
    level. Stops counting past `limit`."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", _ESCAPE.sub("x", text)))
    depth = 0
    while brackets and depth <= limit:
        stripped = _EMPTY_PAIR.sub("", brackets)
        if stripped == brackets:
            return depth + brackets.count("[") + brackets.count("{")
        brackets, depth = stripped, depth + 1
    return depth


def parse_json(data, problem):
    """json.loads of the bytes `data`; a failure raises AdapterError(problem + ": why")."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AdapterError(f"{problem}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    if json_depth_bound(text) > MAX_JSON_DEPTH:
        raise AdapterError(f"{problem}: arrays and objects nest deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digit limit; the bound makes RecursionError moot
        raise AdapterError(f"{problem}: {type(exc).__name__}: {str(exc)[:200]}") from None


# ---- field checks: each returns the normalised value or raises _Invalid -------------------------

class _Invalid(Exception):
    def __init__(self, expected, why="", where=None, value=None):
        super().__init__(expected)
        self.expected, self.why, self.where, self.value = expected, why, where, value


def _boolean(value):
    if not isinstance(value, bool):
        raise _Invalid("true or false")
    return value


def _rank(value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        why = (" (a boolean is not a rank)" if isinstance(value, bool)
               else " (a rank is a whole number)" if isinstance(value, float) else "")
        raise _Invalid("a positive number", why)
    return value


def _alpha(value):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        finite = ok and math.isfinite(float(value))
    except OverflowError:  # an int beyond float range
        finite = False
    if not (finite and value > 0):
        raise _Invalid("a finite positive number")
    return value


def _regex(value, template="{}"):
    try:
        re.compile(value)
        re.compile(template.format(value))
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise _Invalid("a valid regular expression", f" ({exc})") from None
    return value


def _str_list(value):
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid("a list of strings")
    return tuple(value)


def _modules(value):
    """target_modules / exclude_modules: null, a list of name suffixes or one regex."""
    if value is None:
        return None
    if isinstance(value, str):
        return _regex(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _Invalid("a list of strings, a regular expression or null")


def _pattern(check):
    """rank_pattern / alpha_pattern: {regex key: value}, as (key, value) pairs in file order."""
    def parse(value):
        if value is None:
            return ()
        if not isinstance(value, dict):
            raise _Invalid("an object {regex: value} or null")
        pairs = []
        for key, item in value.items():
            for part, what in ((lambda: _regex(key, r"(.*\.)?({})$"), key), (lambda: check(item), item)):
                try:
                    part()
                except _Invalid as bad:
                    bad.where, bad.value = f"key {short(key)}", what
                    raise
            pairs.append((key, item))
        return tuple(pairs)
    return parse


def _layers_to_transform(value):
    def index(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if value is None:
        return None
    if index(value):
        return (value,)
    if isinstance(value, list) and all(index(v) for v in value):
        return tuple(value)
    raise _Invalid("an integer >= 0, a list of them or null")


def _layers_pattern(value):
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise _Invalid("a string, a list of strings or null")
    for p in patterns:
        try:
            _regex(p, r".*\.{}\.(\d+)\.")
        except _Invalid as bad:
            bad.where, bad.value = f"entry {short(p)}", p
            raise
    return tuple(patterns)


def _one_of(*choices):
    def parse(value):
        if not isinstance(value, str) or value not in choices:
            raise _Invalid("one of " + ", ".join(map(repr, choices)))
        return value
    return parse


def _init(value):
    if not isinstance(value, (bool, str)):
        raise _Invalid("true, false or the name of an initialisation")
    return value


def _dropout(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise _Invalid("a number in [0, 1)")
    return float(value)


def _optional(kind, expected):
    def parse(value):
        if value is not None and not isinstance(value, kind):
            raise _Invalid(f"{expected} or null")
        return value
    return parse


# field: (check, default when absent; None: the check decides). The fields lora_ext reads or refuses.
_FIELDS = {
    "r": (_rank, None), "lora_alpha": (_alpha, None), "use_rslora": (_boolean, False), "lora_dropout": (_dropout, 0.0),
    "rank_pattern": (_pattern(_rank), None), "alpha_pattern": (_pattern(_alpha), None),
    "target_modules": (_modules, None), "exclude_modules": (_modules, None),
    "layers_to_transform": (_layers_to_transform, None), "layers_pattern": (_layers_pattern, None),
    "bias": (_one_of("none", "all", "lora_only"), "none"), "fan_in_fan_out": (_boolean, False),
    "init_lora_weights": (_init, True), "use_dora": (_boolean, False), "lora_bias": (_boolean, False),
    "use_qalora": (_boolean, False),
    "modules_to_save": (lambda v: None if v is None else _str_list(v), None),
    "base_model_name_or_path": (_optional(str, "a string"), None),
    "layer_replication": (_optional(list, "a list of [start, end] pairs"), None),
    "target_parameters": (lambda v: None if v is None else _str_list(v), None),
    "trainable_token_indices": (_optional((list, dict), "a list or an object"), None),
    "alora_invocation_tokens": (_optional(list, "a list of token ids"), None),
    **{f: (_optional(dict, "an object"), None)
       for f in ("kasa_config", "monteclora_config", "arrow_config", "use_bdlora")},
}
_NOT_IMPLEMENTED_CONFIGS = {"kasa_config": "KaSA", "monteclora_config": "MonteCLoRA",
                            "arrow_config": "Arrow routing", "use_bdlora": "block-diagonal LoRA"}


@dataclass(frozen=True)
class AdapterConfig:
    """A validated adapter_config.json. rank(module) / alpha(module) / scaling(module) apply PEFT's
    rank_pattern / alpha_pattern (first matching key wins) and rsLoRA."""

    adapter: str
    file: str
    r: int
    lora_alpha: float
    use_rslora: bool
    lora_dropout: float
    rank_pattern: tuple   # ((regex key, rank), ...) in file order
    alpha_pattern: tuple  # ((regex key, alpha), ...)
    target_modules: object  # tuple of name suffixes, one regex string, or None
    exclude_modules: object
    layers_to_transform: object  # tuple of layer indices or None
    layers_pattern: object       # tuple of strings or None
    bias: str
    fan_in_fan_out: bool  # where the base weight is (in, out); LoRA A/B are stored alike either way
    init_lora_weights: object
    use_dora: bool
    lora_bias: bool
    use_qalora: bool
    modules_to_save: object
    base_model_name_or_path: object
    layer_replication: object
    target_parameters: object
    trainable_token_indices: object
    alora_invocation_tokens: object
    kasa_config: object
    monteclora_config: object
    arrow_config: object
    use_bdlora: object
    peft_type: str = "LORA"
    extra: dict = field(default_factory=dict, compare=False)  # keys lora_ext does not read

    def rank(self, module):
        return pattern_value(self.rank_pattern, module, self.r)

    def alpha(self, module):
        return pattern_value(self.alpha_pattern, module, self.lora_alpha)

    def scaling(self, module):
        """PEFT's scaling of `module` as a float: alpha / sqrt(r) with rsLoRA, else alpha / r;
        an AdapterError naming the module if it is not finite."""
        rank, alpha = self.rank(module), self.alpha(module)
        try:
            value = float(alpha) / (math.sqrt(rank) if self.use_rslora else float(rank))
        except (OverflowError, ZeroDivisionError):
            value = math.nan
        if not math.isfinite(value):
            raise AdapterError(f"adapter {self.adapter!r}: {self.file}: module {module!r}: scaling "
                               f"{short(alpha, 40)} / {'sqrt' if self.use_rslora else ''}({short(rank, 40)}) "
                               "is not a finite number")
        return value

    @property
    def largest_rank(self):
        """The largest rank any module can get (r or a rank_pattern value)."""
        return max([self.r, *(rank for _, rank in self.rank_pattern)])


def names_module(entries, module):
    """PEFT's rule for a list of module names (target_modules, modules_to_save): an entry names
    `module` when it is its full name or a whole-segment suffix of it."""
    return any(module == e or module.endswith("." + e) for e in entries)


def pattern_value(patterns, module, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first key that matches the module's name.
    `patterns`: a dict or (key, value) pairs."""
    for key, value in (patterns.items() if isinstance(patterns, dict) else patterns or ()):
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scaling(config, module):
    """(rank, scaling) that PEFT gives this module."""
    return config.rank(module), config.scaling(module)


def read_config(name, path):
    """The validated AdapterConfig of the adapter directory `path`; AdapterError on anything
    unreadable, mistyped or unsupported."""
    file = os.path.join(os.fspath(path), CONFIG_FILE)
    try:
        f, size = open_regular_file(name, file)
    except FileNotFoundError:
        raise AdapterError(f"adapter {name!r}: {file} is missing") from None
    with f:
        data = read_limited(name, file, f, size, MAX_CONFIG_BYTES)
    raw = parse_json(data, f"adapter {name!r}: {file} cannot be read as JSON")
    return parse_config(name, raw, file)


def parse_config(name, raw, file):
    """The validated AdapterConfig of the mapping `raw` (a parsed adapter_config.json, or the
    fields of a new adapter); `file` names where it came from in messages."""
    if not isinstance(raw, dict):
        raise AdapterError(f"adapter {name!r}: {file} must hold a JSON object, not {type(raw).__name__}")
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":  # before the other fields: another method's config has other ones
        _refuse(name, file, [f"peft_type {short(peft_type)} (only LORA adapters are supported)"])
    values = {}
    for key, (check, default) in _FIELDS.items():
        value = raw.get(key, default)
        try:
            values[key] = check(value)
        except _Invalid as bad:
            where = f" {bad.where}" if bad.where else ""
            shown = bad.value if bad.where else value
            raise AdapterError(f"adapter {name!r}: {file} field {key!r}{where} must be {bad.expected}, "
                               f"not {short(shown)}{bad.why}") from None
    extra = {k: v for k, v in raw.items() if k not in _FIELDS and k != "peft_type"}
    config = AdapterConfig(adapter=name, file=file, extra=extra, **values)
    refuse_unsupported_config(name, config)
    return config


def _refuse(name, file, refusals):
    raise AdapterError(f"adapter {name!r}: {file} uses unsupported features: " + "; ".join(refusals))


def refuse_unsupported_config(name, config):
    """Config features that change the math and are not implemented are refused by name."""
    refusals = []
    if config.peft_type != "LORA":
        refusals.append(f"peft_type {config.peft_type!r} (only LORA adapters are supported)")
    if config.use_dora and config.lora_bias:
        refusals.append("use_dora=true with lora_bias=true (PEFT does not define them together)")
    if config.bias != "none":
        refusals.append(f"bias={config.bias!r} (trained biases are not supported)")
    if config.layer_replication:
        refusals.append("layer_replication (not supported)")
    if config.target_parameters:
        refusals.append(f"target_parameters={list(config.target_parameters)!r} (LoRA on parameters is not supported)")
    if config.trainable_token_indices:
        refusals.append("trainable_token_indices (trainable tokens are not supported)")
    if config.alora_invocation_tokens:
        refusals.append("alora_invocation_tokens (activated LoRA is not supported)")
    if config.use_qalora:
        refusals.append("use_qalora=true (QA-LoRA's pooled inputs are not supported)")
    for key, method in _NOT_IMPLEMENTED_CONFIGS.items():
        if getattr(config, key):
            refusals.append(f"{key} ({method} is not supported)")
    if str(config.init_lora_weights).lower().startswith(_INIT_THAT_CHANGES_THE_BASE):
        refusals.append(f"init_lora_weights={config.init_lora_weights!r} (it changes the base weights; convert "
                        "the adapter to plain LoRA with PEFT first)")
    if refusals:
        _refuse(name, config.file, refusals)
