"""Tensor-parallel models (transformers' tp_plan="auto", weights as DTensor shards): a patched
Llama, Mistral (2 ranks) or Qwen2 on 2 and 4 real processes (gloo, as torchrun launches them) gives the one-process logits,
generations, merges, eviction and gradients; each rank keeps only its shard of every adapter;
bad input is refused on every rank (tests/tp_worker.py runs the checks)."""

import os
import subprocess
import sys

import pytest
import torch

from tiny_models import build_model, save_adapter, save_all_adapters

pytest.importorskip("transformers")
pytest.importorskip("peft")
# 4 key/value heads: 4 ranks each get a whole one
OVERRIDES = dict(num_key_value_heads=4)


@pytest.fixture(scope="module")
def tp_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    for arch in ("llama", "mistral", "qwen2"):
        build_model(arch, **OVERRIDES).save_pretrained(root / arch / "model")
        save_all_adapters(arch, root / arch / "adapters", model_overrides=OVERRIDES)
        # fits a model with a wider MLP: refused by this one's mlp layers
        save_adapter(arch, str(root / arch / "bad_adapter"), model_overrides=dict(OVERRIDES, intermediate_size=96),
                     r=4, lora_alpha=8, target_modules=["up_proj"])
    return root


TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2 and torch.distributed.is_nccl_available()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("backend,ranks", [
    ("gloo", 2), ("gloo", 4),
    pytest.param("nccl", 2, marks=pytest.mark.skipif(not TWO_GPUS, reason="needs 2 CUDA devices and NCCL"))])
def test_tensor_parallel_matches_one_process(tp_root, backend, ranks):
    worker = os.path.join(os.path.dirname(__file__), "tp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if backend == "gloo":
        env["CUDA_VISIBLE_DEVICES"] = ""
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                          str(ranks), worker, str(tp_root), *(["llama", "mistral", "qwen2"] if ranks == 2
                                                              else ["llama", "qwen2"])],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert run.stdout.count("all checks passed") == ranks, run.stdout


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_bench_tp_counts_no_added_collective(tmp_path):
    """lora-ext bench --tp 2 under torchrun: both scenarios timed, and the patched model's forward
    runs the base model's collectives plus the one adapter-name check, none per layer."""
    import json

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "lora_ext", "bench", "--tp", "2", "--quick", "--batch-size", "4",
                          "--num-adapters", "2", "--rank", "4", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    result = json.loads((tmp_path / "tp_bench.json").read_text())
    assert result["collectives_added_per_layer"] == 0, result["collectives"]
    base, lora = (sum(result["collectives"][k].values()) for k in ("base", "lora_ext"))
    assert base > 0 and lora == base + 1, result["collectives"]
    assert all(row["decode_step_ms"] > 0 for row in result["rows"]), result["rows"]
