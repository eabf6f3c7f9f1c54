"""Prefill and decode timing for one way of serving a batch.

A runner serves a batch of prompts: prefill once, then decode one token per row per step with
the KV cache. Times are medians over repeats (prefill) and over steps and repeats (decode).
"""

import statistics
import time

import torch


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class BatchRunner:
    """All rows in one forward pass: `call(**model_kwargs)` is the model with its adapter routing."""

    def __init__(self, call):
        self.call = call

    def prefill(self, ids, mask):
        out = self.call(input_ids=ids, attention_mask=mask, use_cache=True)
        return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), mask

    def step(self, state):
        past, tokens, mask = state
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = self.call(input_ids=tokens, attention_mask=mask, past_key_values=past, use_cache=True)
        return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), mask


class SplitRunner:
    """One forward pass per adapter group, as servers that hold one adapter per model do."""

    def __init__(self, groups):
        self.groups = groups  # list of (row indices, BatchRunner)

    def prefill(self, ids, mask):
        return [runner.prefill(ids[rows], mask[rows]) for rows, runner in self.groups]

    def step(self, states):
        return [runner.step(state) for (_, runner), state in zip(self.groups, states)]


def time_runner(runner, ids, mask, new_tokens, repeats, device, progress=None):
    """(median prefill seconds, median decode seconds per step)."""
    prefill, steps = [], []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up and is not counted
            _sync(device)
            t0 = time.perf_counter()
            state = runner.prefill(ids, mask)
            _sync(device)
            prefill.append(time.perf_counter() - t0)
            round_steps = []
            for _ in range(new_tokens):
                t0 = time.perf_counter()
                state = runner.step(state)
                _sync(device)
                round_steps.append(time.perf_counter() - t0)
            steps.append(round_steps)
            if progress is not None:
                progress.update(1)
    return statistics.median(prefill[1:]), statistics.median(s for r in steps[1:] for s in r)
