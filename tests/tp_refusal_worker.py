"""Run by tests/test_tensor_parallel.py under torch.distributed.run (2 processes, gloo): a tiny
Llama loaded with transformers' tensor parallelism is refused by patch_model with a clear error,
and the model is left exactly as it was."""

import sys
import warnings

import torch

import lora_ext
from lora_ext.model.lora_layer import LoraLayer

warnings.simplefilter("ignore")
from transformers import AutoModelForCausalLM  # noqa: E402

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], tp_plan="auto", dtype=torch.float32)
ids = torch.tensor([[1, 5, 9, 33, 7, 60]])
with torch.no_grad():
    before = model(ids).logits
try:
    lora_ext.patch_model(model)
except ValueError as e:
    message = str(e)
else:
    raise SystemExit("patch_model accepted a tensor-parallel model")
for expected in ("'model.layers.0.self_attn.q_proj'", "tensor-parallel", "Shard(dim=0)", "mesh of 2 ranks"):
    assert expected in message, (expected, message)
assert not any(isinstance(m, LoraLayer) for m in model.modules()), "a layer was patched"
with torch.no_grad():
    assert torch.equal(model(ids).logits, before), "the model changed"
torch.distributed.destroy_process_group()
print("refused as expected")
