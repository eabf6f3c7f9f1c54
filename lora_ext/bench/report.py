"""The benchmark's outputs: a table, a JSON file with every figure and the setup, a PNG plot."""

import logging
import os

from lora_ext import atomic

# (title, meaning, number format or None for text, key in each row); widths follow the content.
COLUMNS = [
    ("scenario", "how the batch is served", None, "scenario"),
    ("adapters", "distinct adapters in the batch", "d", "adapters"),
    ("prefill tok/s", "prompt tokens per second (median of repeats)", ".0f", "prefill_tokens_per_s"),
    ("decode tok/s", "generated tokens per second (median over steps and repeats; the adapter-by-adapter\n"
     "and PEFT rows time a third of the steps per round)", ".1f", "decode_tokens_per_s"),
    ("step ms", "one decode step for the whole batch", ".2f", "decode_step_ms"),
    ("overhead ms", "decode step time beyond the base model's", ".2f", "overhead_ms"),
    ("floor ms", "time to stream the adapter bytes one step reads, at the measured bandwidth", ".2f", "floor_ms"),
    ("over/floor", "overhead / floor (1.0 = at the memory limit)", ".2f", "overhead_over_floor"),
]


def _text(value, spec):
    if value is None:
        return "-"
    return str(value) if spec is None else format(value, spec)


def format_table(rows):
    """The rows as a table: text left-aligned, numbers right-aligned, each column as wide as its
    widest cell."""
    cells = [[title for title, _, _, _ in COLUMNS]] + [[_text(row.get(key), spec) for _, _, spec, key in COLUMNS]
                                                         for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join(" ".join(cell.ljust(w) if spec is None else cell.rjust(w)
                              for cell, w, (_, _, spec, _) in zip(line, widths, COLUMNS)).rstrip()
                     for line in cells)


def column_help():
    """What each column means, one column a line (continuations indented under the meaning)."""
    width = max(len(title) for title, _, _, _ in COLUMNS)
    indent = "\n" + " " * (width + 4)
    return "\n".join(f"  {title:{width}}  {indent.join(meaning.splitlines())}" for title, meaning, _, _ in COLUMNS)


def write_json(path, result):
    atomic.write_json(path, result, indent=1, default=str)


# base: grey; lora_ext's own scenarios: blue; the ways others serve the same batch: red.
KIND_COLORS = {"base": "#777777", "lora_ext": "#3b75af", "merged": "#7fa7cf"}


def write_plot(path, rows, title):
    import matplotlib

    matplotlib.use("Agg")
    # A first run on a machine builds matplotlib's font cache and says so; nothing to act on.
    font_log = logging.getLogger("matplotlib.font_manager")
    level = font_log.level
    font_log.setLevel(logging.ERROR)
    try:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    finally:
        font_log.setLevel(level)

    names = [r["scenario"] for r in rows]
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
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_outputs(out_dir, result, text, plot_title):
    """bench.json, bench.txt and bench.png into out_dir (made if missing)."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "bench.json"), result)
    atomic.write_text(os.path.join(out_dir, "bench.txt"), text + "\n")
    write_plot(os.path.join(out_dir, "bench.png"), result["rows"], plot_title)
