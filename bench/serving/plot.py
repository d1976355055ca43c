"""The PNG of a sweep or a comparison: latency against achieved output tokens/s, one colour per server."""

from __future__ import annotations

from pathlib import Path

from . import log
from .runner import Run


def points(runs: list[Run], server: str) -> list[dict]:
    """The server's completed runs, by achieved output tokens/s."""
    done = [r.summary for r in runs if r.server == server and r.summary and r.summary["completed"]]
    return sorted(done, key=lambda s: s["output_throughput"])


def plot(runs: list[Run], path: Path, title: str) -> Path | None:
    """Median (solid) and p99 (dashed) TTFT and TPOT against achieved output tokens/s; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    servers = list(dict.fromkeys(r.server for r in runs))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, server in enumerate(servers):
        summaries = points(runs, server)
        xs = [s["output_throughput"] for s in summaries]
        for ax, metric in zip(axes, ("ttft_ms", "tpot_ms")):
            for stat, style in (("median", "o-"), ("p99", "x--")):
                ys = [s[metric].get(stat) for s in summaries]
                if xs and None not in ys:
                    ax.plot(xs, ys, style, color=colors[k % len(colors)], label=f"{server} {stat}")
    for ax, name in zip(axes, ("TTFT", "TPOT")):
        ax.set(xlabel="achieved output tokens/s", ylabel=f"{name} (ms)", yscale="log", title=name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
