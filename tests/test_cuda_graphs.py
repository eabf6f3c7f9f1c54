"""The ops under CUDA graph capture: no host sync, no data-dependent launch; replays with new
slot ids (written into the captured buffer) give the right rows."""

import pytest
import torch

import lora_ext
from helpers import check_lora_delta, make_inputs

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("rows,dtype", [(64, torch.bfloat16), (4096, torch.bfloat16), (7, torch.float32)])
def test_graph_replay_with_changing_slot_ids(rows, dtype):
    slots = 16
    inputs = make_inputs(rows, 256, 512, slots, 16, dtype, "cuda", "with_none", seed=1)
    static_ids = inputs["slot_ids"].clone()
    out = torch.empty(rows, 512, device="cuda", dtype=dtype)

    def step():
        plan = lora_ext.build_plan(static_ids, slots)  # rebuilt inside the graph on every replay
        out.copy_(lora_ext.lora_delta(inputs["x"], inputs["lora_a"], inputs["lora_b"], static_ids,
                                      inputs["scales"], inputs["ranks"], plan))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    g = torch.Generator().manual_seed(2)
    for replay in range(4):
        new_ids = torch.randint(-1, slots, (rows,), generator=g)
        static_ids.copy_(new_ids)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        case = dict(inputs, slot_ids=new_ids)
        check_lora_delta(out, case, what=f"replay {replay}")
