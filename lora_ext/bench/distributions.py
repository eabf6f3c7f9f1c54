"""Adapter distributions over a batch: which slot (adapter) each row uses, -1 for the base model.

One module for the op tests (tests/helpers.py) and the kernel benchmark
(benchmarks/bench_kernels.py), so that both speak of the same batches. Each distribution draws
the ids of `rows` rows over `slots` slots from `generator` (the draws below are part of the
contract: the tests' inputs depend on them):

    unsorted            each row a uniformly random slot (randint)
    sorted              unsorted, rows then sorted by slot
    with_none           unsorted, then each row on the base model (-1) with probability 0.3
    one_slot            every row on the last slot: one adapter for the whole batch
    all_none            every row on the base model
    distinct            row i on slot i % slots, in row order
    shuffled            distinct slots in random row order (randperm(rows) % slots)
    shuffled_with_none  shuffled, then each row on the base model with probability 0.3
    zipf                slot k (1-based) with weight 1 / k^1.5: a few popular adapters, a long tail
    runs                `slots` runs of consecutive rows (prefill: each prompt's tokens on one adapter)

`uniform_groups(rows)` is the number of adapters of a "uniform" batch in the kernel benchmark:
about sqrt(rows) adapters, each shared by about sqrt(rows) rows.
"""

import math

import torch

# The distributions every op test runs over.
DISTRIBUTIONS = ("sorted", "unsorted", "with_none", "one_slot", "all_none", "distinct")
ALL_DISTRIBUTIONS = DISTRIBUTIONS + ("shuffled", "shuffled_with_none", "zipf", "runs")
BASE_ROW_PROBABILITY = 0.3  # share of rows on the base model in with_none and shuffled_with_none


def slot_ids_for(distribution, rows, slots, generator):
    """Slot ids (int64, shape (rows,)) of one adapter distribution over a batch."""
    if distribution == "one_slot":
        return torch.full((rows,), slots - 1, dtype=torch.long)
    if distribution == "all_none":
        return torch.full((rows,), -1, dtype=torch.long)
    if distribution == "distinct":
        return torch.arange(rows) % slots
    if distribution in ("shuffled", "shuffled_with_none"):
        ids = torch.randperm(rows, generator=generator) % slots
        return _some_on_base(ids, generator) if distribution == "shuffled_with_none" else ids
    if distribution == "zipf":
        weights = 1.0 / torch.arange(1, slots + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(weights, rows, replacement=True, generator=generator)
    if distribution == "runs":
        return torch.arange(rows) * slots // rows
    if distribution not in ("unsorted", "sorted", "with_none"):
        raise ValueError(f"unknown distribution {distribution!r}; known: {', '.join(ALL_DISTRIBUTIONS)}")
    ids = torch.randint(0, slots, (rows,), generator=generator)
    if distribution == "sorted":
        return ids.sort().values
    if distribution == "with_none":
        return _some_on_base(ids, generator)
    return ids


def _some_on_base(ids, generator):
    ids[torch.rand(ids.numel(), generator=generator) < BASE_ROW_PROBABILITY] = -1
    return ids


def uniform_groups(rows):
    """Adapters of a "uniform" batch of `rows` rows: about sqrt(rows), each shared by as many rows."""
    return max(1, round(math.sqrt(rows)))
