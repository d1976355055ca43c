"""The PNG of a run: our speed over llama.cpp's per pair of formats, prefill and decode, a bar per batch size."""

from __future__ import annotations

import math
from pathlib import Path

from . import log

TICKS = (0.125, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 16, 32)  # ratios marked on the log axis


def label(result: dict) -> str:
    """The run in one line: model, CPU, threads, date and commit."""
    machine, settings = result["machine"], result["settings"]
    return (
        f"{settings['model']}, prompt {settings['prompt_tokens']}, {settings['new_tokens']} new tokens, "
        f"{settings['threads']} threads, medians of {settings['rounds']} rounds; {machine['cpu']}, "
        f"{machine['date'][:10]}, commit {machine['git_commit'][:7]}"
    )


def figure(result: dict):
    """``result`` (the JSON ``bench/llama_cpp.py`` writes) drawn: ratios of ours over llama.cpp's on a log scale, so
    that 2x faster and 2x slower sit as far from the dashed line at 1. Needs matplotlib."""
    from matplotlib.figure import Figure  # pyplot-free: no global figure to close, no backend to pick
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    rows = result["rows"]
    pairs = list(dict.fromkeys((r["ours"], r["llama_cpp"]) for r in rows))
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    width = 0.8 / max(len(batches), 1)
    fig = Figure(figsize=(12, 4.8))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, phase in zip(axes, ("prefill", "decode")):
        for k, batch in enumerate(batches):
            xs, ys = [], []
            for i, pair in enumerate(pairs):
                row = next((r for r in rows if (r["ours"], r["llama_cpp"]) == pair and r["batch"] == batch), None)
                value = None if row is None else row[f"{phase}_ratio"]
                if value is not None and math.isfinite(value):
                    xs.append(i + (k - (len(batches) - 1) / 2) * width)
                    ys.append(value)
            bars = ax.bar(xs, ys, width, label=f"batch {batch}")
            ax.bar_label(bars, labels=[f"{y:.2f}x" for y in ys], fontsize=7, padding=2)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="llama.cpp")
        ax.set_xticks(range(len(pairs)), [f"{o} vs {p}" for o, p in pairs])
        ax.set(yscale="log", title=phase)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    ratios = [r[k] for r in rows for k in ("prefill_ratio", "decode_ratio") if r[k] is not None and math.isfinite(r[k])]
    axes[0].set_ylim(min(ratios + [1.0]) / 1.4, max(ratios + [1.0]) * 1.4)  # shared: both panels on one scale
    axes[0].set_ylabel("ours / llama.cpp, tokens/s")
    axes[0].yaxis.set_major_locator(FixedLocator(TICKS))
    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
    axes[0].yaxis.set_minor_locator(NullLocator())
    axes[0].legend(fontsize=8)
    fig.suptitle(label(result), fontsize=9)
    fig.tight_layout()
    return fig


def plot(result: dict, path: Path) -> Path | None:
    """:func:`figure` saved to ``path`` (logged); None without matplotlib."""
    try:
        fig = figure(result)
    except ImportError:
        log("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return None
    fig.savefig(path, dpi=110)
    log(f"plot: {path}")
    return path
