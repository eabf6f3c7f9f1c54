"""Prefill and decode timing for one way of serving a batch.

A runner serves a batch of prompts: prefill once, then decode one token per row per step with
the KV cache (a transformers DynamicCache). The times of every round and step are returned as
measured; figures.py takes the medians.
"""

import inspect
from contextlib import nullcontext

import torch

from lora_ext.bench.measure import interleaved_rounds, seconds


def cache_argument(model):
    """The name under which `model`'s forward takes and returns its KV cache: "cache" in the
    transformers releases that deprecate "past_key_values", "past_key_values" before them."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(model):
    """An empty KV cache for `model`, the kind transformers builds itself for a decoder."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # releases whose DynamicCache takes no config
        return DynamicCache()


class BatchRunner:
    """All rows in one forward pass: `call(**model_kwargs)` is the model with its adapter routing;
    `model` is the Hugging Face model underneath (it decides the cache's type and argument name)."""

    def __init__(self, call, model):
        self.call = call
        self.model = model
        self.cache_arg = cache_argument(model)

    def prefill(self, ids, mask):
        return self._forward(ids, mask, new_cache(self.model))

    def step(self, state):
        cache, tokens, mask = state
        return self._forward(tokens, torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1), cache)

    def _forward(self, ids, mask, cache):
        out = self.call(input_ids=ids, attention_mask=mask, use_cache=True, **{self.cache_arg: cache})
        return out[self.cache_arg], out.logits[:, -1].argmax(-1, keepdim=True), mask


class SplitRunner:
    """One forward pass per adapter group, as servers that hold one adapter per model do."""

    def __init__(self, groups):
        self.groups = groups  # list of (row indices, BatchRunner)

    def prefill(self, ids, mask):
        return [runner.prefill(ids[rows], mask[rows]) for rows, runner in self.groups]

    def step(self, states):
        return [runner.step(state) for (_, runner), state in zip(self.groups, states)]


def run_round(runner, ids, mask, steps, device, settings=None):
    """One prefill and `steps` decode steps: (prefill seconds, [seconds of each step]). settings:
    a context manager (kernel settings) held around the round, outside the timed calls."""
    with torch.no_grad(), settings or nullcontext():
        state, prefill = seconds(runner.prefill, ids, mask, device=device)
        step_times = []
        for _ in range(steps):
            state, t = seconds(runner.step, state, device=device)
            step_times.append(t)
    return prefill, step_times


def time_interleaved(scenarios, ids, mask, repeats, device, progress=None, probe=None):
    """Times every scenario (name, runner, steps per round, settings()) in each of `repeats`
    rounds after one warm-up round, interleaved so that drift in the machine's speed hits all of
    them alike; probe() (the memory bandwidth now) runs before each timed round.

    Returns {name: {"prefill": [seconds per round], "steps": [[seconds of each step] per round]},
             "probe": [probe result per round]}.
    """
    def timed(scenario):
        def call():
            if progress is not None:
                progress.set_postfix_str(scenario.name)
            result = run_round(scenario.runner, ids, mask, scenario.steps, device, scenario.settings())
            if progress is not None:
                progress.update(1)
            return result
        return call

    rounds = interleaved_rounds({s.name: timed(s) for s in scenarios}, repeats, before_round=probe)
    times = {"probe": rounds.pop("before_round", [])}
    for name, results in rounds.items():
        times[name] = dict(prefill=[prefill for prefill, _ in results], steps=[steps for _, steps in results])
    return times
