"""`lora-ext bench` end to end on small settings: outputs written, tokens checked against PEFT,
a mismatch makes it exit non-zero."""

import json

import pytest

from lora_ext.bench import main as bench
from lora_ext.cli import main as cli_main

SMALL = ["--num-adapters", "4", "--batch-size", "4", "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1"]


def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("peft")
    assert cli_main(["bench", *SMALL, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["correctness"]["ok"] and result["correctness"]["rows_matching"] == 4
    kinds = {row["kind"] for row in result["rows"]}
    assert kinds == {"base", "lora_ext", "split", "merged", "peft"}
    assert all(row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0 for row in result["rows"])
    assert result["setup"]["build"]["native"] and result["bandwidth_bytes_per_s"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "over/floor" in (tmp_path / "bench.txt").read_text()
    # On CPU in float32 the fused GEMM runs alone in its own scenario, so the LoRA work is reported;
    # the bandwidth is probed before each timed round.
    rows = {row["scenario"]: row for row in result["rows"]}
    gemm_only, ours = rows[bench.GEMM_ONLY], rows["lora_ext 4 adapters"]
    work = ours["step_ms_per_round"][0] - gemm_only["step_ms_per_round"][0]
    assert result["summary"]["lora_work_ms"] == pytest.approx(work)
    assert result["summary"]["fused_gemm_saving_ms"] == pytest.approx(-gemm_only["overhead_ms"])
    assert len(result["bandwidth_per_round_bytes_per_s"]) == 1 and result["bandwidth_per_round_bytes_per_s"][0] > 0


def test_token_mismatch_exits_non_zero(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "check_tokens", lambda *a: dict(checked=True, rows=4, rows_matching=3,
                                                               mismatched_rows=[2], ok=False))
    pytest.importorskip("peft")
    assert bench.main([*SMALL, "--out", str(tmp_path)]) == 1


@pytest.mark.parametrize("flag", ["--batch-size", "--new-tokens", "--num-adapters"])
def test_bench_refuses_non_positive_sizes(flag, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main([flag, "0"])
    assert info.value.code == 2
    assert f"{flag} must be at least 1" in capsys.readouterr().err
