"""Training examples: JSONL datasets ({"text": ...} or {"prompt": ..., "completion": ...} per line,
the loss on the completion only when one is given) or the built-in demo tasks, as token rows."""

import json
import random

import torch

from lora_ext.adapters.config import AdapterError

IGNORE = -100  # labels that take no loss


def read_jsonl(name, path, tokenizer, max_len):
    """[(input_ids, labels)] of one dataset file; AdapterError naming the file and line on bad lines."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AdapterError(f"dataset {name!r}: {path} line {number} is not JSON: {exc}") from None
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                ids = tokenizer(record["text"])["input_ids"][:max_len]
                examples.append((ids, list(ids)))
            elif isinstance(record, dict) and isinstance(record.get("prompt"), str) and \
                    isinstance(record.get("completion"), str):
                prompt = tokenizer(record["prompt"])["input_ids"]
                completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
                ids = (prompt + completion)[:max_len]
                examples.append((ids, ([IGNORE] * len(prompt) + completion)[:max_len]))
            else:
                raise AdapterError(f"dataset {name!r}: {path} line {number} must be an object with a string "
                                   "'text', or string 'prompt' and 'completion'")
    if not examples:
        raise AdapterError(f"dataset {name!r}: {path} holds no examples")
    return examples


def demo_tasks(names, symbols, pairs, seed=0):
    """One task per adapter that a random model cannot do: read a symbol, answer its image under
    that adapter's own fixed permutation of the symbols. {name: (permutation, sampler)}; sampler(n,
    generator) gives n rows alternating symbol, answer, with the loss on the answers only."""
    rng = random.Random(seed)
    tasks = {}
    for name in names:
        permutation = list(symbols)
        rng.shuffle(permutation)
        table = torch.tensor(permutation)
        first = symbols[0]

        def sample(n, generator, table=table, first=first):
            xs = torch.randint(first, first + len(table), (n, pairs), generator=generator)
            ys = table[xs - first]
            ids = torch.stack([xs, ys], dim=2).reshape(n, 2 * pairs)
            labels = ids.clone()
            labels[:, 0::2] = IGNORE  # symbols are given; answers are learned
            return ids, labels
        tasks[name] = (table, sample)
    return tasks


def pad_rows(examples, pad_id):
    """(input_ids, labels, attention_mask) of a list of (ids, labels), right-padded."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (row, row_labels) in enumerate(examples):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, :len(row_labels)] = torch.tensor(row_labels)
        mask[i, :len(row)] = 1
    return ids, labels, mask
