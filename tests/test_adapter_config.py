"""Adapter files as untrusted input: every class of bad adapter_config.json or safetensors file is
an AdapterError naming the adapter, the file, the field or key and the value, before any tensor is
read, and leaves every loaded adapter and output as it was; fuzzed files never end in any other
exception."""

import json
import os
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_ext
from lora_ext.adapters import peft_format
from lora_ext.adapters.config import read_config
from test_adapter_memory import D_IN, TinyNet, _tensors, snapshot, write_adapter

CFG, ST = "adapter_config.json", "adapter_model.safetensors"
A1, B1 = "base_model.model.fc1.lora_A.weight", "base_model.model.fc1.lora_B.weight"
INF, NAN = float("inf"), float("nan")


@pytest.fixture
def served(tmp_path):
    """A patched model with two adapters loaded, a batch and its output."""
    mm = lora_ext.patch_model(TinyNet(), max_adapters=3, max_rank=8)
    for name, seed, rank in (("a1", 1, 2), ("a2", 2, 5)):
        mm.load_adapter(name, write_adapter(tmp_path / name, seed=seed, rank=rank))
    x = torch.randn(4, D_IN, generator=torch.Generator().manual_seed(0))
    names = ["a1", "a2", "__base__", "a1"]
    return mm, x, names, mm(x, adapter_names=names)


@pytest.fixture
def reads(monkeypatch):
    """Keys whose tensor bytes were read."""
    seen, real = [], peft_format.read_tensor_bytes

    def spy(*args):
        seen.append(args[-2])  # (name, file, f, key, entry)
        return real(*args)

    monkeypatch.setattr(peft_format, "read_tensor_bytes", spy)
    return seen


def assert_refused(served, path, *needles, allow_pickle=False):
    """load_adapter raises an AdapterError naming the adapter and every needle; nothing changed."""
    mm, x, names, out = served
    state = snapshot(mm)
    with pytest.raises(lora_ext.AdapterError) as info:
        mm.load_adapter("bad", str(path), allow_pickle=allow_pickle)
    for needle in ("'bad'", *needles):
        assert needle in str(info.value), f"{needle!r} not in {str(info.value)!r}"
    assert snapshot(mm) == state
    assert torch.equal(mm(x, adapter_names=names), out)
    return str(info.value)


def with_config(path, text=None, **fields):
    """A good adapter whose config has `fields` replaced (or is `text`, str or bytes)."""
    write_adapter(path, seed=9, config=fields)
    if text is not None:
        (path / CFG).write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def config_case(fields, *needles):
    return pytest.param(fields, needles, id=repr(fields)[:60])


def check_config_cases(served, tmp_path, fields, needles):
    """The config with `fields` replaced is refused, naming the file and every needle."""
    assert_refused(served, with_config(tmp_path / "bad", **fields), CFG, *needles)


# ---- adapter_config.json: one test per class of bad value ----------------------------------------

@pytest.mark.parametrize("fields,needles", [
    config_case(dict(lora_alpha=INF), "'lora_alpha'", "inf"),
    config_case(dict(lora_alpha=NAN), "'lora_alpha'", "nan"),
    config_case(dict(lora_alpha=-INF), "'lora_alpha'", "-inf"),
    config_case(dict(lora_alpha=10**400), "'lora_alpha'", "1000000"),
    config_case(dict(alpha_pattern={"fc1": INF}), "'alpha_pattern'", "'fc1'", "inf"),
    config_case(dict(alpha_pattern={"fc.*": 2.0, "fc2": NAN}), "'alpha_pattern'", "'fc2'", "nan"),
])
def test_non_finite_alpha_refused(served, tmp_path, fields, needles):
    check_config_cases(served, tmp_path, fields, needles)


@pytest.mark.parametrize("fields,needles", [
    config_case(dict(target_modules="fc(["), "'target_modules'", "'fc(['"),
    config_case(dict(exclude_modules="*x"), "'exclude_modules'", "'*x'"),
    config_case(dict(rank_pattern={"fc([": 4}), "'rank_pattern'", "'fc(['"),
    config_case(dict(rank_pattern={"a)|(b": 4}), "'rank_pattern'", "'a)|(b'"),
    config_case(dict(alpha_pattern={"+": 2.0}), "'alpha_pattern'", "'+'"),
    config_case(dict(layers_pattern=["layers", "(h"]), "'layers_pattern'", "'(h'"),
])
def test_bad_regex_refused(served, tmp_path, fields, needles):
    check_config_cases(served, tmp_path, fields, needles)


@pytest.mark.parametrize("fields,needles", [
    config_case(dict(use_rslora="yes"), "'use_rslora'", "'yes'"),
    config_case(dict(use_rslora=1), "'use_rslora'", "1"),
    config_case(dict(use_dora="false"), "'use_dora'", "'false'"),
    config_case(dict(use_dora=0), "'use_dora'", "0"),
    config_case(dict(lora_bias="no"), "'lora_bias'", "'no'"),
    config_case(dict(fan_in_fan_out=None), "'fan_in_fan_out'", "None"),
])
def test_non_bool_booleans_refused(served, tmp_path, fields, needles):
    check_config_cases(served, tmp_path, fields, needles)


@pytest.mark.parametrize("fields,needles", [
    config_case(dict(r=0), "'r'", "0"),
    config_case(dict(r=-4), "'r'", "-4"),
    config_case(dict(r=4.0), "'r'", "4.0"),
    config_case(dict(r=True), "'r'", "True"),
    config_case(dict(r="4"), "'r'", "'4'"),
    config_case(dict(rank_pattern={"fc1": 0}), "'rank_pattern'", "'fc1'", "0"),
    config_case(dict(rank_pattern={"fc1": False}), "'rank_pattern'", "'fc1'", "False"),
    config_case(dict(rank_pattern={"fc2": 2.5}), "'rank_pattern'", "'fc2'", "2.5"),
])
def test_bad_ranks_refused(served, tmp_path, fields, needles):
    check_config_cases(served, tmp_path, fields, needles)


@pytest.mark.parametrize("fields,needles", [
    config_case(dict(target_modules=5), "'target_modules'", "5"),
    config_case(dict(target_modules=["fc1", 2]), "'target_modules'", "['fc1', 2]"),
    config_case(dict(rank_pattern=["fc1"]), "'rank_pattern'", "['fc1']"),
    config_case(dict(alpha_pattern="fc1"), "'alpha_pattern'", "'fc1'"),
    config_case(dict(layers_to_transform="0"), "'layers_to_transform'", "'0'"),
    config_case(dict(layers_to_transform=[0, -1]), "'layers_to_transform'", "[0, -1]"),
    config_case(dict(layers_to_transform=[True]), "'layers_to_transform'", "[True]"),
    config_case(dict(layers_pattern=3), "'layers_pattern'", "3"),
    config_case(dict(modules_to_save="head"), "'modules_to_save'", "'head'"),
    config_case(dict(bias="some"), "'bias'", "'some'"),
    config_case(dict(init_lora_weights=3), "'init_lora_weights'", "3"),
    config_case(dict(peft_type=None), "peft_type", "None"),
    config_case(dict(base_model_name_or_path=["x"]), "'base_model_name_or_path'", "['x']"),
    config_case(dict(layer_replication="all"), "'layer_replication'", "'all'"),
])
def test_wrong_types_and_containers_refused(served, tmp_path, fields, needles):
    check_config_cases(served, tmp_path, fields, needles)


@pytest.mark.parametrize("text,needles", [
    ("[]", ("JSON object", "list")), ("4", ("JSON object", "int")), ('"LORA"', ("JSON object", "str")),
    ("null", ("JSON object", "NoneType")), ('{"r": 4, "lora_alpha": 8', ("cannot be read as JSON",)),
    ('{"r": 4, "lora_alpha": 8, "x": ' + "[" * 65 + "]" * 65 + "}", ("deeper than 64",)),
    ('{"r": 4, "lora_alpha": 8, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", ("deeper than 64",)),
    ('{"x": ' * 100_000, ("deeper than 64",)), ("[" * 100_000, ("deeper than 64",)),
    (b'{"r": 4, "lora_alpha": 8, "note": "\xff"}', ("not UTF-8", "0xff at offset 35")),
    ('{"r": 4, "lora_alpha": 8}'.encode("utf-16"), ("not UTF-8",)),
    ('{"r": 4, "lora_alpha": 8, "pad": "' + "x" * (1 << 20) + '"}', ("more than the limit of 1048576 bytes",)),
    ('["' + '\\"' * 500_000, ("cannot be read as JSON",)),  # once quadratic in the depth check
], ids=["list", "int", "str", "null", "unterminated", "depth 65", "depth 100000", "open objects",
        "open lists", "latin-1 byte", "utf-16", "huge", "escaped quotes"])
def test_unreadable_config_refused(served, tmp_path, text, needles):
    assert_refused(served, with_config(tmp_path / "bad", text=text), CFG, *needles)


def test_unknown_metadata_and_full_peft_configs_load(served, tmp_path):
    peft = pytest.importorskip("peft")
    mm = served[0]
    mm.load_adapter("meta", with_config(tmp_path / "meta", my_note={"who": ["me", 1, None]}, peft_version="9.9",
                                        auto_mapping=None, runtime_config={"ephemeral_gpu_offload": False}))
    full = write_adapter(tmp_path / "full", seed=3, rank=4)
    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], use_rslora=True,
                    rank_pattern={"fc2": 4}, alpha_pattern={"fc2": 2}).save_pretrained(full)
    mm.load_adapter("full", full)
    assert mm.store.record("full").scalings == {"fc1": 4.0, "fc2": 1.0}
    config = read_config("full", full)
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 8, True)
    assert sorted(config.target_modules) == ["fc1", "fc2"]
    assert (config.rank("fc2"), config.scaling("fc2"), config.largest_rank) == (4, 1.0, 4)


def test_non_finite_scaling_names_the_module(tmp_path):
    config = read_config("big", with_config(tmp_path / "big", r=10**400, use_rslora=True))
    with pytest.raises(lora_ext.AdapterError, match=r"adapter 'big': .*module 'fc1'.* scaling"):
        config.scaling("fc1")


# ---- files that are not regular files -------------------------------------------------------------

def _replace(path, file, kind):
    os.remove(path / file)
    {"dir": os.mkdir, "fifo": os.mkfifo, "device": lambda p: os.symlink("/dev/null", p)}[kind](path / file)


@pytest.mark.parametrize("file", [CFG, ST])
@pytest.mark.parametrize("kind", ["dir", "fifo", "device"])
def test_non_regular_files_refused(served, tmp_path, file, kind):
    path = with_config(tmp_path / "bad")
    _replace(path, file, kind)
    result = []  # in a thread: a FIFO opened for blocking reads would hang the test

    def load():
        try:
            result.append(assert_refused(served, path, file, "not a regular file"))
        except BaseException as exc:  # noqa: BLE001 (re-raised below)
            result.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(20)
    assert result, "load_adapter blocked on a non-regular file"
    if isinstance(result[0], BaseException):
        raise result[0]


def test_symlinks_to_regular_files_load(served, tmp_path):
    real = write_adapter(tmp_path / "real", seed=4)
    os.mkdir(tmp_path / "links")
    for file in (CFG, ST):
        os.symlink(os.path.join(real, file), tmp_path / "links" / file)
    served[0].load_adapter("linked", tmp_path / "links")
    assert served[0].store.record("linked").ranks == {"fc1": 4, "fc2": 4}


# ---- safetensors: the header reader against the library, and headers that lie -------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn])
def test_header_reader_reads_what_safetensors_reads(tmp_path, dtype):
    from safetensors.torch import load_file

    path = write_adapter(tmp_path / "d", seed=1, tensors={k: v.to(dtype) for k, v in _tensors(("fc1", "fc2")).items()})
    expected = load_file(os.path.join(path, ST))
    got = lora_ext.read_peft_adapter("d", path, modules={"fc1": (24, 40), "fc2": (40, 16)}, max_rank=4).modules
    for m in ("fc1", "fc2"):
        for half, tensor in (("A", got[m].lora_a), ("B", got[m].lora_b)):
            want = expected[f"base_model.model.{m}.lora_{half}.weight"]
            assert tensor.dtype == dtype and torch.equal(tensor.view(torch.uint8), want.view(torch.uint8))


def test_inspect_shows_the_validated_config(tmp_path, capsys):
    from lora_ext.cli import main as cli_main

    good = with_config(tmp_path / "good", rank_pattern={"fc2": 4}, layers_pattern="h", note="hi")
    assert cli_main(["inspect", str(good)]) == 0
    out = capsys.readouterr().out
    assert "rank_pattern={'fc2': 4}" in out and "layers_pattern=['h']" in out and "does not read: note" in out
    assert cli_main(["inspect", str(with_config(tmp_path / "bad", use_rslora="yes"))]) == 1
    assert "problem: adapter 'inspected'" in capsys.readouterr().out


def st_parts(file):
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def st_write(file, header, body, length=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    file.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + body)


def _edit(key, **changes):
    return lambda header, body: ({**header, key: {**header[key], **changes}}, body, None)


def _overlap(header, body):
    a = header[A1]["data_offsets"][0]
    return {**header, B1: {**header[B1], "data_offsets": [a + 4, a + 644]}}, body, None


@pytest.mark.parametrize("edit,needles", [
    (lambda h, b: (h, b, 1 << 62), ("header length 4611686018427387904",)),
    (lambda h, b: (h, b, len(json.dumps(h)) + len(b) + 1), ("header length",)),
    (lambda h, b: (h, b[:-1], None), ("outside the file",)),
    (_edit(A1, data_offsets=[0, 10**6]), (A1, "outside the file", "1000000")),
    (_overlap, ("overlap", A1, B1)),
    (_edit(A1, shape=[4, 25]), (A1, "[4, 25]", "384")),
    (_edit(A1, shape=[4, -24]), (A1, "[4, -24]")),
    (_edit(A1, shape=[4, True]), (A1, "[4, True]")),
    (_edit(A1, data_offsets=[8]), (A1, "[8]")),
    (_edit(A1, dtype="I32"), (A1, "I32", "floating point")),
    (_edit(A1, dtype="Q7"), (A1, "'Q7'")),
    (lambda h, b: ([1, 2], b, None), ("header", "JSON object", "list")),
    (lambda h, b: ({**h, A1: 5}, b, None), (A1, "5")),
    (lambda h, b: (b"\xff" * 16, b, None), ("not UTF-8",)),
    (lambda h, b: (("[" * 200 + "]" * 200).encode(), b, None), ("deeper than 64",)),
], ids=["absurd length", "length past end", "truncated", "range outside", "overlap", "shape x dtype",
        "negative dim", "bool dim", "offsets", "integer dtype", "unknown dtype", "not object",
        "entry not object", "not utf-8", "deep"])
def test_lying_safetensors_header_refused(served, tmp_path, reads, edit, needles):
    path = with_config(tmp_path / "bad")
    header, body, length = edit(*st_parts(path / ST))
    st_write(path / ST, header, body, length)
    assert_refused(served, path, ST, *needles)
    assert reads == []


@pytest.mark.parametrize("keys,needles", [
    ((A1, B1, "base_model.model.fc3.lora_A.weight", "base_model.model.fc3.lora_B.weight"),
     ("not patched: ['fc3'] (1 of 2)",)),
    ((A1, B1, "base_model.model.fc1.weight"), ("base_model.model.fc1.weight", "not LoRA A/B weights")),
    ((A1, B1, "base_model.model.fc1.bias"), ("base_model.model.fc1.bias", "biases other than lora_B's are not supported")),
    ((A1, B1, "fc1.lora_A.default.weight"), ("'fc1'", A1, "fc1.lora_A.default.weight")),
])
def test_keys_of_unpatched_modules_or_base_weights_refused(served, tmp_path, reads, keys, needles):
    tensors = _tensors(("fc1", "fc2", "fc3"))
    extra = {"base_model.model.fc1.weight": torch.zeros(40, 24), "base_model.model.fc1.bias": torch.zeros(40),
             "fc1.lora_A.default.weight": torch.zeros(4, 24)}
    path = write_adapter(tmp_path / "bad", seed=1, tensors={k: {**tensors, **extra}[k] for k in keys})
    assert_refused(served, path, *needles)
    assert reads == []


def test_ranks_and_shapes_refused_from_the_header(served, tmp_path, reads):
    assert_refused(served, write_adapter(tmp_path / "r", seed=1, rank=9), "rank 9 exceeds max_rank=8", "'fc1'")
    assert_refused(served, write_adapter(tmp_path / "s", seed=1, tensors=_tensors(("fc1",), d_in=23)),
                   "do not fit the layer (24 -> 40)", "(4, 23)")
    assert reads == []
    with pytest.raises(lora_ext.AdapterError, match=r"rank 9 exceeds max_rank=2"):
        lora_ext.read_peft_adapter("r", tmp_path / "r", modules={"fc1": (24, 40), "fc2": (40, 16)}, max_rank=2)
    assert len(lora_ext.read_peft_adapter("r", tmp_path / "r").modules) == 2  # no limits: only the file's


@pytest.mark.parametrize("tensors,needles", [
    ({**_tensors(("fc1",)), "base_model.model.fc1.weight": torch.zeros(40, 24)}, ("not LoRA A/B weights",)),
    (_tensors(("fc1", "fc3")), ("not patched: ['fc3']",)),
    ({A1: torch.zeros(4, 24, dtype=torch.int32), B1: torch.zeros(40, 4)}, ("floating point", "torch.int32")),
    (_tensors(("fc1",), rank=9), ("rank 9 exceeds max_rank=8",)),
])
def test_pickle_gets_the_same_checks(served, tmp_path, tensors, needles):
    path = write_adapter(tmp_path / "bad", seed=1, rank=tensors[A1].shape[0])
    torch.save(tensors, path + "/adapter_model.bin")
    os.remove(os.path.join(path, ST))
    assert_refused(served, path, "adapter_model.bin", *needles, allow_pickle=True)


# ---- fuzzing: only success or AdapterError, and nothing registered on error ------------------------

FUZZ = settings(max_examples=1000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6)
    | st.sampled_from(["fc1", "fc.*", "(", "LORA", "none", "pissa", 4, 8.0]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5) | st.sampled_from(["fc1", "fc2"]),
                                                                inner, max_size=3), max_leaves=6)
FIELDS = ["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
          "layers_to_transform", "layers_pattern", "bias", "fan_in_fan_out", "init_lora_weights", "use_dora",
          "lora_bias", "modules_to_save", "peft_type", "layer_replication", "target_parameters", "use_qalora",
          "trainable_token_indices", "alora_invocation_tokens", "base_model_name_or_path", "kasa_config"]
OTHER_KEYS = ["base_model.model.fc1.weight", "base_model.model.fc3.lora_A.weight", "fc2.lora_B.default.weight",
              "base_model.model.fc1.lora_A.weight", "__metadata__"]
flips = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=3)
rare_flips = st.one_of(st.just([]), st.just([]), flips)  # most mutations leave the syntax alone


def outcome(served, path):
    """Loads `path`: success (then unloads it) or an AdapterError with nothing registered."""
    mm, state = served[0], snapshot(served[0])
    try:
        mm.load_adapter("fuzz", str(path))
    except lora_ext.AdapterError:
        assert snapshot(mm) == state
        return "refused"
    mm.unload_adapter("fuzz")
    return "loaded"


def flipped(data, changes):
    data = bytearray(data)
    for at, byte in changes:
        if data:
            data[at % len(data)] = byte
    return bytes(data)


def test_fuzz_config(served, tmp_path):
    path = write_adapter(tmp_path / "fz", seed=7, rank=4, config=dict(rank_pattern={"fc2": 4}))
    base = json.loads((path_ := tmp_path / "fz" / CFG).read_text())
    seen = set()

    @FUZZ
    @given(edits=st.lists(st.tuples(st.sampled_from(FIELDS) | st.text(max_size=8), json_values | st.just(KeyError)),
                          max_size=4), changes=rare_flips)
    def run(edits, changes):
        config = dict(base)
        for field, value in edits:
            config.pop(field, None) if value is KeyError else config.__setitem__(field, value)
        path_.write_bytes(flipped(json.dumps(config).encode(), changes))
        seen.add(outcome(served, path))

    run()
    assert seen == {"loaded", "refused"}
    mm, x, names, out = served
    assert torch.equal(mm(x, adapter_names=names), out)


def test_fuzz_safetensors(served, tmp_path):
    path = tmp_path / "fz"
    write_adapter(path, seed=8, rank=4)
    header, body = st_parts(path / ST)
    keys, parts = sorted(k for k in header if k != "__metadata__"), ["dtype", "shape", "data_offsets"]
    seen = set()

    @FUZZ
    @given(edits=st.lists(st.tuples(st.sampled_from(keys), st.sampled_from(parts), json_values), max_size=2),
           length=st.none() | st.none() | st.integers(0, 2**64 - 1), changes=rare_flips,
           cut=st.none() | st.none() | st.integers(0, 3000), header_flips=rare_flips,
           renames=st.lists(st.tuples(st.sampled_from(keys), st.sampled_from(OTHER_KEYS) | st.text(max_size=12)),
                            max_size=1))
    def run(edits, length, changes, cut, header_flips, renames):
        new = {k: dict(v) for k, v in header.items()}
        for key, part, value in edits:
            new[key][part] = value
        for key, to in renames:
            new[to] = new.pop(key, {})
        raw = flipped(json.dumps(new).encode(), [(at % 64 + 8, b) for at, b in header_flips])
        data = (len(raw) if length is None else length).to_bytes(8, "little") + raw + flipped(body, changes)
        (path / ST).write_bytes(data if cut is None else data[:cut])
        seen.add(outcome(served, path))

    run()
    assert seen == {"loaded", "refused"}
    mm, x, names, out = served
    assert torch.equal(mm(x, adapter_names=names), out)
