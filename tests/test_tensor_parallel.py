"""Tensor-parallel models (transformers' tp_plan) are not supported yet: patch_model refuses them
before changing anything, naming the module and its sharding, instead of failing mid-forward.
Two real processes on gloo, as torchrun launches them."""

import os
import subprocess
import sys

import pytest
import torch

from tiny_models import build_model

pytest.importorskip("transformers")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_patch_model_refuses_a_tensor_parallel_model(tmp_path):
    build_model("llama").save_pretrained(tmp_path / "tiny")
    worker = os.path.join(os.path.dirname(__file__), "tp_refusal_worker.py")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          worker, str(tmp_path / "tiny")], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("refused as expected") == 2, run.stdout
