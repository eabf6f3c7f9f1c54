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


def run_round(runner, ids, mask, new_tokens, device):
    """One prefill and `new_tokens` decode steps: (prefill seconds, [seconds of each step])."""
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        state = runner.prefill(ids, mask)
        _sync(device)
        prefill = time.perf_counter() - t0
        steps = []
        for _ in range(new_tokens):
            t0 = time.perf_counter()
            state = runner.step(state)
            _sync(device)
            steps.append(time.perf_counter() - t0)
    return prefill, steps


def time_interleaved(runners, ids, mask, new_tokens, repeats, device, progress=None, steps_of=None, probe=None):
    """Times every runner in each of `repeats` rounds (after one warm-up round), interleaved so that
    drift in the machine's speed hits all of them alike. steps_of: {name: decode steps per round}
    for runners that take fewer than `new_tokens` (the slow baselines, whose steps vary little).

    Returns {name: {"prefill": [per round], "step": [median step per round], "steps": [all steps]},
             "probe": [probe result per round]}.
    """
    times = {name: {"prefill": [], "step": [], "steps": []} for name in runners}
    times["probe"] = []
    for round_index in range(repeats + 1):
        if probe is not None and round_index > 0:
            times["probe"].append(probe())
        for name, runner in runners.items():
            if progress is not None:
                progress.set_postfix_str(name)
            prefill, steps = run_round(runner, ids, mask, (steps_of or {}).get(name, new_tokens), device)
            if round_index > 0:
                times[name]["prefill"].append(prefill)
                times[name]["step"].append(statistics.median(steps))
                times[name]["steps"].extend(steps)
            if progress is not None:
                progress.update(1)
    return times
