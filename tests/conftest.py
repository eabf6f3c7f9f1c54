import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import helpers and tolerances

from kernel_paths import CPU_CONFIGS, assert_config_paths  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(params=list(CPU_CONFIGS))
def cpu_config(request):
    """Runs the test under one CPU kernel configuration (kernel_paths.CPU_CONFIGS), then checks that
    the calls which did LoRA work took that configuration's paths (and never the ones it excludes)."""
    from lora_ext import kernel_config

    with kernel_config.configured(**CPU_CONFIGS[request.param]), kernel_config.paths_taken() as taken:
        yield request.param
    assert_config_paths(request.param, taken)
