"""`lora-ext bench --matrix` on small settings: every cell it promises is there, its mixes are the
ones it describes, its floors, targets and overheads follow from facts computed here (layer
shapes, the recorded samples, the measured bandwidth and GEMM rates), and compiled serving of
new adapter mixes compiles nothing again."""

import json
import statistics
import subprocess
import sys
from collections import Counter

import pytest

from lora_ext.bench.matrix_bench import DECODE_ROWS, decode_mixes
from test_bench_command import layer_widths

RANK = 16
COUNTS = (1, 2, 8)
PROMPT = 16
PAIRS = 3
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run in a process of its own, as a user starts it."""
    out = tmp_path_factory.mktemp("matrix")
    command = [sys.executable, "-m", "lora_ext", "bench", "--matrix", "--dtypes", "float32", "bfloat16",
               "--counts", *map(str, COUNTS), "--prefill-dtypes", "float32", "--prefill-counts", "1", "2",
               "--prompt-len", str(PROMPT), "--pairs", str(PAIRS), "--prefill-pairs", "1", "--compile",
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(result=json.loads((out / "matrix.json").read_text()), text=(out / "matrix.txt").read_text(),
                stdout=done.stdout, stderr=done.stderr)


@pytest.mark.parametrize("n", [1, 2, 8, 32, 64])
def test_decode_mixes_are_as_described(n):
    mixes = dict(decode_mixes(n))
    spread = mixes.pop("identical" if n == 1 else "distinct" if n == max(DECODE_ROWS, n) else "uniform")
    assert len(spread) == max(DECODE_ROWS, n) and set(spread) == set(range(n))
    assert max(Counter(spread).values()) - min(Counter(spread).values()) <= 1  # round-robin
    with_base = mixes.pop("with base rows")
    assert with_base.count(None) == len(spread) // 4
    assert Counter(a for a in with_base if a is not None) == Counter(spread)
    if n > 1:
        zipf = Counter(mixes.pop("zipf"))
        assert sum(zipf.values()) == max(DECODE_ROWS, 2 * n) and set(zipf) == set(range(n))
        counts = [zipf[k] for k in range(n)]
        assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]  # a few popular adapters
    assert not mixes
    assert spread != sorted(spread) or n == 1  # rows are not sorted by adapter


def test_every_cell_is_measured(run):
    rows = run["result"]["rows"]
    cells = Counter((r["phase"], r["dtype"], r["compiled"], r["adapters"], r["mix"]) for r in rows)
    expected = Counter()
    for dtype in ("float32", "bfloat16"):
        for n in COUNTS:
            for mix, adapters in decode_mixes(n):
                expected[("decode", dtype, False, n, mix)] += 1
                if len(adapters) == DECODE_ROWS:
                    expected[("decode", dtype, True, n, mix)] += 1
    for n in (1, 2):
        expected[("prefill", "float32", False, n, "one prompt each")] += 1
    assert cells == expected
    for r in rows:
        assert len(set(a for a in r["row_adapters"] if a is not None)) == r["adapters"]
        assert r["tokens_per_row"] == (PROMPT if r["phase"] == "prefill" else 1)


def test_overheads_are_medians_of_the_paired_samples(run):
    for r in run["result"]["rows"]:
        base, lora = r["base_samples_ms"], r["lora_samples_ms"]
        assert len(base) == len(lora) == (1 if r["phase"] == "prefill" else PAIRS)
        assert r["overhead_ms"] == pytest.approx(statistics.median(b - a for a, b in zip(base, lora)))
        assert r["base_ms"] == pytest.approx(statistics.median(base))


def test_floors_and_targets_follow_from_the_layer_shapes(run):
    result = run["result"]
    bandwidth, rates = result["floors"]["bandwidth"], result["floors"]["gemm_rate"]
    per_adapter = sum(RANK * (d_in + d_out) for d_in, d_out in layer_widths())
    layers = len(layer_widths())
    assert result["floors"]["layers"] == layers
    for r in result["rows"]:
        adapter_rows = sum(a is not None for a in r["row_adapters"])
        bytes_s = r["adapters"] * per_adapter * ELEMENT_BYTES[r["dtype"]] / bandwidth
        # a 16-bit cell's FLOPs at the faster of its dtype's and float32's measured GEMM rates
        flops_s = 2 * adapter_rows * r["tokens_per_row"] * per_adapter / max(rates[r["dtype"]], rates["float32"])
        assert r["floor_ms"] == pytest.approx(max(bytes_s, flops_s) * 1e3)
        if r["phase"] == "decode":
            target = 1.5 * max(bytes_s, flops_s) + 2e-6 * layers
        else:
            target = 0.2 * r["base_ms"] / 1e3 + flops_s
        assert r["target_ms"] == pytest.approx(target * 1e3)
        assert r["meets_target"] == (r["overhead_ms"] <= r["target_ms"])
        assert r["over_floor"] == pytest.approx(r["overhead_ms"] / r["floor_ms"])


def test_compiled_serving_compiles_nothing_for_new_mixes(run):
    assert run["result"]["recompiles"] == {"float32": 0, "bfloat16": 0}
    assert "0 frames compiled again after the first adapter mix" in run["text"]


def test_report_lists_every_cell_and_the_count_that_meets_the_target(run):
    rows = run["result"]["rows"]
    table = run["text"].split("\n\n")[0].splitlines()
    assert len(table) == len(rows) + 1
    met = sum(r["meets_target"] for r in rows)
    assert f"cells meeting the target: {met} of {len(rows)}" in run["text"]
    assert run["text"] in run["stdout"]
    assert "Warning" not in run["stderr"], run["stderr"]


def test_the_setup_names_the_allocator_setting(run):
    """The prefill cells are timed with glibc keeping freed memory (measure.keep_freed_memory):
    the run says so, since it changes the base model's times as well."""
    import platform

    allocator = run["result"]["setup"]["allocator"]
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert allocator.startswith("glibc mallopt: mmap threshold 1 GiB")
    else:
        assert allocator == "default"
