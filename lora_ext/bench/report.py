"""The benchmark's outputs: a table, a JSON file with every figure and the setup, a PNG plot."""

import json
import os

# (title, meaning, width, number format or None for text, key in each row)
COLUMNS = [
    ("scenario", "how the batch is served", 34, None, "scenario"),
    ("adapters", "distinct adapters in the batch", 8, "d", "adapters"),
    ("prefill tok/s", "prompt tokens per second (median of repeats)", 13, ".0f", "prefill_tokens_per_s"),
    ("decode tok/s", "generated tokens per second (median over steps and repeats; the adapter-by-adapter\n"
     "                 and PEFT rows time a third of the steps per round)", 12, ".1f", "decode_tokens_per_s"),
    ("step ms", "one decode step for the whole batch", 8, ".2f", "decode_step_ms"),
    ("overhead ms", "decode step time beyond the base model's", 11, ".2f", "overhead_ms"),
    ("floor ms", "time to stream the adapter bytes one step reads, at the measured bandwidth", 8, ".2f", "floor_ms"),
    ("over/floor", "overhead / floor (1.0 = at the memory limit)", 10, ".2f", "overhead_over_floor"),
]


def _cell(value, width, spec):
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:<{width}}" if spec is None else f"{value:>{width}{spec}}"


def format_table(rows):
    header = " ".join(f"{t:<{w}}" if spec is None else f"{t:>{w}}" for t, _, w, spec, _ in COLUMNS)
    body = [" ".join(_cell(row.get(key), w, spec) for _, _, w, spec, key in COLUMNS) for row in rows]
    return "\n".join([header] + body)


def column_help():
    return "\n".join(f"  {title:14} {meaning}" for title, meaning, _, _, _ in COLUMNS)


def write_json(path, result):
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


# base: grey; lora_ext's own scenarios: blue; the ways others serve the same batch: red.
KIND_COLORS = {"base": "#777777", "lora_ext": "#3b75af", "merged": "#7fa7cf"}


def write_plot(path, rows, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["scenario"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key, label in ((axes[0], "prefill_tokens_per_s", "prefill tokens/s"),
                           (axes[1], "decode_tokens_per_s", "decode tokens/s")):
        values = [r[key] for r in rows]
        bars = ax.barh(names, values, color=[KIND_COLORS.get(r["kind"], "#c44e52") for r in rows])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xlabel(label)
        ax.invert_yaxis()
    axes[1].set_yticklabels([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ensure_dir(path):
    os.makedirs(path, exist_ok=True)
    return path
