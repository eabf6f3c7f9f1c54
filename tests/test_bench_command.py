"""`lora-ext bench` end to end on small settings, its figures checked against facts computed here
(layer shapes and adapter ranks, the step times it records, the table's columns), its output free
of library warnings, a token mismatch making it exit non-zero."""

import json
import statistics
import subprocess
import sys

import pytest
import torch

import lora_ext
from lora_ext.bench import check
from lora_ext.bench import main as bench
from lora_ext.bench.synthetic import DEFAULT_MODEL_CONFIG

ADAPTERS, BATCH, PROMPT, STEPS, ROUNDS = 4, 4, 8, 2, 3
SMALL = ["--num-adapters", str(ADAPTERS), "--batch-size", str(BATCH), "--prompt-len", str(PROMPT),
         "--new-tokens", str(STEPS), "--repeats", str(ROUNDS)]
MIXED_RANKS = (8, 16, 32, 64)  # the ranks the bench's mixed-rank adapters cycle through


def layer_widths():
    """(d_in, d_out) of every linear layer of the built-in Llama but the output head."""
    c = DEFAULT_MODEL_CONFIG
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_block = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
    return per_block * c["num_hidden_layers"]


def adapter_bytes(ranks):
    """float32 bytes of adapters of these ranks on every linear layer: each A (r, d_in), B (d_out, r)."""
    return sum(r * (d_in + d_out) * 4 for r in ranks for d_in, d_out in layer_widths())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run, in a process of its own as a user starts it (so every warning it prints shows)."""
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "lora_ext", "bench", *SMALL, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(result=json.loads((out / "bench.json").read_text()), text=(out / "bench.txt").read_text(),
                stdout=done.stdout, stderr=done.stderr, out=out)


def test_outputs_and_token_check(run):
    result = run["result"]
    assert result["correctness"]["ok"] and result["correctness"]["rows_matching"] == BATCH
    assert {row["kind"] for row in result["rows"]} == {"base", "lora_ext", "split", "merged", "peft"}
    assert result["setup"]["build"]["native"] and result["bandwidth_bytes_per_s"] > 0
    assert len(result["bandwidth_per_round_bytes_per_s"]) == ROUNDS
    assert (run["out"] / "bench.png").stat().st_size > 1000
    assert run["text"] in run["stdout"]


def test_floor_is_the_adapter_bytes_over_the_bandwidth(run):
    rows = {row["scenario"]: row for row in run["result"]["rows"]}
    expected = {"lora_ext 1 adapter": adapter_bytes([16]),
                f"lora_ext {ADAPTERS} adapters": adapter_bytes([16] * ADAPTERS),
                f"lora_ext {ADAPTERS} adapters, ranks 8/16/32/64": adapter_bytes(MIXED_RANKS[:ADAPTERS]),
                f"PEFT mixed batch, {ADAPTERS} adapters": adapter_bytes([16] * ADAPTERS)}
    bandwidth = run["result"]["bandwidth_bytes_per_s"]
    for name, nbytes in expected.items():
        assert rows[name]["adapter_bytes_per_step"] == nbytes, name
        assert rows[name]["floor_ms"] == pytest.approx(nbytes / bandwidth * 1e3), name
        assert rows[name]["overhead_over_floor"] == pytest.approx(rows[name]["overhead_ms"] / rows[name]["floor_ms"])


def test_figures_follow_from_the_recorded_step_times(run):
    result = run["result"]
    rows = {row["scenario"]: row for row in result["rows"]}
    for row in result["rows"]:
        steps = row["step_ms_by_round"]
        assert len(steps) == ROUNDS and all(len(s) == row["decode_steps_per_round"] for s in steps)
        assert row["decode_steps_per_round"] == (max(2, STEPS // 3) if row["kind"] in ("split", "peft") else STEPS)
        assert row["step_ms_per_round"] == pytest.approx([statistics.median(s) for s in steps])
        assert row["decode_step_ms"] == pytest.approx(statistics.median(x for s in steps for x in s))
        assert row["decode_tokens_per_s"] == pytest.approx(BATCH / row["decode_step_ms"] * 1e3)
        assert row["prefill_tokens_per_s"] == pytest.approx(BATCH * PROMPT / row["prefill_s"])
    # Each overhead is the median over rounds of that round's step minus the base model's (the
    # merged adapter's is against the base model timed in its own rounds, not a row).
    base = rows["base model (no adapters)"]
    for row in result["rows"]:
        if row["kind"] in ("base", "merged"):
            assert ("overhead_ms" in row) == (row["kind"] == "merged")
            continue
        diffs = [a - b for a, b in zip(row["step_ms_per_round"], base["step_ms_per_round"])]
        assert row["overhead_ms"] == pytest.approx(statistics.median(diffs)), row["scenario"]
    ours = rows[f"lora_ext {ADAPTERS} adapters"]
    summary = result["summary"]
    assert summary["overhead_over_floor"] == pytest.approx(ours["overhead_ms"] / ours["floor_ms"])
    peft = rows[f"PEFT mixed batch, {ADAPTERS} adapters"]
    if peft["overhead_ms"] > 0:
        assert summary["overhead_vs_peft"] == pytest.approx(ours["overhead_ms"] / peft["overhead_ms"])


def test_kernel_paths_are_the_claimed_ones(run):
    """Where linear_lora fuses the decode batch, the N-adapter batch and the GEMM-only scenario
    take the fused path in every linear layer of the model, the unfused scenario never."""
    result = run["result"]
    fusing = sum(bool(lora_ext.native_available()) and lora_ext.kernel_config.linear_lora_fuses(BATCH, d_in, torch.float32)
                 for d_in, _ in layer_widths())
    if not fusing:
        assert result["kernel_paths"] == {}
        assert "lora_ext op, no adapter rows" not in {row["scenario"] for row in result["rows"]}
        return
    layers = len(layer_widths())
    paths = result["kernel_paths"]
    assert set(paths) == {f"lora_ext {ADAPTERS} adapters", "lora_ext op, no adapter rows",
                          f"lora_ext {ADAPTERS} adapters, unfused"}
    assert all(p["ok"] for p in paths.values())
    assert paths[f"lora_ext {ADAPTERS} adapters"]["taken"]["cpu_linear_fused"] == fusing
    assert paths["lora_ext op, no adapter rows"]["taken"]["cpu_linear_fused"] == fusing
    unfused = paths[f"lora_ext {ADAPTERS} adapters, unfused"]["taken"]
    assert unfused["cpu_linear_unfused"] == layers and "cpu_linear_fused" not in unfused
    summary, rows = result["summary"], {row["scenario"]: row for row in result["rows"]}
    assert summary["fused_gemm_saving_ms"] == pytest.approx(-rows["lora_ext op, no adapter rows"]["overhead_ms"])


def test_table_columns_line_up(run):
    """Each column of the table starts (text) or ends (numbers) where its title does, whatever the
    length of the scenario names."""
    table = run["text"].split("\n\n")[0].splitlines()
    header, body = table[0], table[1:]
    titles = ["scenario", "adapters", "prefill tok/s", "decode tok/s", "step ms", "overhead ms", "floor ms",
              "over/floor"]
    ends = [header.index(t) + len(t) for t in titles[1:]]
    assert len(body) == len(run["result"]["rows"])
    for line, row in zip(body, run["result"]["rows"]):
        assert line.startswith(row["scenario"] + " ")
        cells = line[len(row["scenario"]):].split()
        assert len(cells) == len(titles) - 1, line
        position = len(row["scenario"])
        for cell, end in zip(cells, ends):
            position = line.index(cell, position) + len(cell)
            assert position == end, f"{cell!r} ends at {position}, its title at {end}: {line!r}"


def test_no_library_warnings_in_the_output(run):
    output = run["stdout"] + run["stderr"]
    for word in ("Warning", "deprecated", "warn("):
        assert word not in output, output


def test_token_mismatch_exits_non_zero(tmp_path, monkeypatch):
    monkeypatch.setattr(check, "check_tokens", lambda workload: dict(checked=True, rows=4, rows_matching=3,
                                                                     mismatched_rows=[2], ok=False))
    tiny = ["--num-adapters", "2", "--batch-size", "2", "--prompt-len", "4", "--new-tokens", "1", "--repeats", "1"]
    assert bench.main([*tiny, "--no-peft", "--out", str(tmp_path)]) == 1


@pytest.mark.parametrize("flag", ["--batch-size", "--new-tokens", "--num-adapters"])
def test_bench_refuses_non_positive_sizes(flag, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main([flag, "0"])
    assert info.value.code == 2
    assert f"{flag} must be at least 1" in capsys.readouterr().err


def test_bench_kinds_quick(tmp_path):
    """lora-ext bench --kinds --quick: every scenario timed, the DoRA comparison reported."""
    run = subprocess.run([sys.executable, "-m", "lora_ext", "bench", "--kinds", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "kinds_bench.json").read_text())
    assert [r["scenario"] for r in result["rows"]] == ["base", "plain LoRA", "DoRA", "lm_head copies",
                                                       "PEFT DoRA, adapter by adapter",
                                                       "PEFT lm_head copies, adapter by adapter"]
    assert result["dora_step_over_plain"] > 0 and "DoRA vs plain LoRA" in run.stdout
