"""Property-based check: any shapes, ranks and slot ids give the reference's answer."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_ext
from helpers import check_lora_delta


@st.composite
def op_inputs(draw):
    rows = draw(st.integers(0, 40))
    d_in = draw(st.integers(1, 70))
    d_out = draw(st.integers(1, 70))
    slots = draw(st.integers(1, 6))
    max_rank = draw(st.integers(1, 20))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    ids = draw(st.lists(st.integers(-1, slots - 1), min_size=rows, max_size=rows))
    ranks = draw(st.lists(st.integers(0, max_rank), min_size=slots, max_size=slots))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    lora_a = torch.randn(slots, max_rank, d_in, generator=g)
    lora_b = torch.randn(slots, d_out, max_rank, generator=g)
    for slot, rank in enumerate(ranks):
        lora_a[slot, rank:] = float("nan")
        lora_b[slot, :, rank:] = float("nan")
    return dict(x=torch.randn(rows, d_in, generator=g).to(dtype), lora_a=lora_a.to(dtype),
                lora_b=lora_b.to(dtype), slot_ids=torch.tensor(ids, dtype=torch.long),
                scales=torch.rand(slots, generator=g), ranks=torch.tensor(ranks)), dtype


@settings(max_examples=150, deadline=None)
@given(op_inputs())
def test_lora_delta_matches_reference_for_any_input(case):
    inputs, dtype = case
    delta = lora_ext.lora_delta(**inputs)
    check_lora_delta(delta, inputs)
