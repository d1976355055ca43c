"""Plots of the kernel benchmarks' CSV: TFLOP/s or GB/s against the swept size, ours against each peer, the roofline.

    python bench/plot.py bench/results/kernels.csv                     # every kernel and sweep in the file
    python bench/plot.py results.csv --kernel linear quant --out plots/ --table

One PNG per kernel, sweep and GPU (``<kernel>_<sweep>_<gpu>.png``), a panel per variant (layer, residual or not, ...)
and dtype, a line per provider on log-log axes, and the roofline of the measured ceilings dashed: what the hardware
allows at that size (bytes over copy bandwidth or flops over the matmul rate, whichever is larger). The CSV
accumulates runs: each point is drawn from its latest measurement. ``--table`` prints, per kernel and dtype, the
geomean over the sweep of each peer's time over ours (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.harness import OURS, read_rows, slug  # noqa: E402

# what each kernel is drawn in: compute-bound ones in TFLOP/s, memory-bound ones in GB/s
TFLOPS_KERNELS = ("linear", "quant", "prefill_attention", "context_attention")
UNITS = {"tflops": "TFLOP/s", "gbps": "GB/s"}


def latest(rows: list[dict]) -> list[dict]:
    """The last measurement of each point (GPU, kernel, sweep, variant, dtype, x, provider) of the CSV."""
    when = lambda r: _dt.datetime.fromisoformat(r["date"])
    keep: dict[tuple, dict] = {}
    for r in rows:
        key = (r["gpu"], r["kernel"], r["sweep"], r["variant"], r["dtype"], r["x"], r["provider"])
        if key not in keep or when(r) >= when(keep[key]):
            keep[key] = r
    return list(keep.values())


def metric(kernel: str, rows: list[dict]) -> str:
    """``tflops`` or ``gbps``: the kernel's natural unit, or the one its rows have."""
    if kernel in TFLOPS_KERNELS and any(r["tflops"] for r in rows):
        return "tflops"
    return "gbps" if any(r["gbps"] for r in rows) else "tflops"


def attainable(row: dict, key: str) -> float | None:
    """The roofline in the plotted unit: the case's work over its floor time."""
    if not row.get("roofline_ms"):
        return None
    work = row["flops"] * 1e-9 if key == "tflops" else row["bytes"] * 1e-6
    return work / row["roofline_ms"] if work else None


def series(rows: list[dict], key: str) -> tuple[dict[str, list[tuple[float, float]]], list[tuple[float, float]]]:
    """Per provider its ``(x, value)`` points sorted by x (OK rows only), and the roofline's points."""
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    roof: dict[float, float] = {}
    for r in rows:
        if r["status"] != "OK" or r[key] is None:
            continue
        lines[r["provider"]].append((r["x"], r[key]))
        top = attainable(r, key)
        if top is not None:
            roof[r["x"]] = top
    order = sorted(lines, key=lambda p: (p != OURS, p))  # ours first, then the peers by name
    return {p: sorted(lines[p]) for p in order}, sorted(roof.items())


def figures(rows: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """Measured rows grouped by (GPU, kernel, sweep): one figure each, a panel per variant and dtype that ran (a
    case skipped for time or failing validation draws nothing, so it gets no empty panel)."""
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["sweep"] and r["status"] == "OK":
            groups[(r["gpu"], r["kernel"], r["sweep"])].append(r)
    return groups


def draw(gpu: str, kernel: str, sweep: str, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = metric(kernel, rows)
    variants = sorted({r["variant"] for r in rows})
    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(len(variants), len(dtypes), figsize=(5.5 * len(dtypes), 3.6 * len(variants)),
                             squeeze=False)  # fmt: skip
    for i, variant in enumerate(variants):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            lines, roof = series([r for r in rows if r["variant"] == variant and r["dtype"] == dtype], key)
            for provider, points in lines.items():
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", linewidth=2.2 if provider == OURS else 1.4, label=provider)
            if roof:
                xs, ys = zip(*roof)
                ax.plot(xs, ys, linestyle="--", color="black", linewidth=1, label="roofline (measured)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")  # a roofline plot: sizes and rates over decades
            ax.set_title(f"{variant} ({dtype})" if variant else dtype, fontsize=10)
            ax.set_xlabel(sweep)
            ax.set_ylabel(UNITS[key])
            ax.grid(True, which="both", alpha=0.3)
            if lines or roof:
                ax.legend(fontsize=8)
    fig.suptitle(f"{kernel}: {UNITS[key]} vs {sweep} on {gpu}")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(csv_path: Path, out_dir: Path, kernels: list[str] | None = None) -> list[Path]:
    """Draw every (GPU, kernel, sweep) of the CSV; returns the PNGs written."""
    rows = latest(read_rows(csv_path))
    written = []
    for (gpu, kernel, sweep), group in sorted(figures(rows).items()):
        if kernels and kernel not in kernels:
            continue
        path = out_dir / f"{kernel}_{slug(sweep)}_{slug(gpu)}.png"
        draw(gpu, kernel, sweep, group, path)
        written.append(path)
    return written


def speedups(rows: list[dict]) -> dict[tuple[str, str, str], tuple[float, int]]:
    """Per (kernel, dtype, peer): the geomean of the peer's time over ours where both ran, and over how many cases."""
    logs: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in rows:
        if r["provider"] != OURS and r["status"] == "OK" and r["triton_speedup"]:
            logs[(r["kernel"], r["dtype"], r["provider"])].append(math.log(r["triton_speedup"]))
    return {k: (math.exp(sum(v) / len(v)), len(v)) for k, v in sorted(logs.items())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", type=Path, help="rows written by bench/kernels/*.py")
    ap.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: plots/ beside the CSV)")
    ap.add_argument("--kernel", nargs="+", default=None, help="only these kernels")
    ap.add_argument("--table", action="store_true", help="also print the geomean speedups of ours over each peer")
    args = ap.parse_args(argv)
    if not args.csv.is_file():
        print(f"plot: no such CSV: {args.csv}", file=sys.stderr)
        return 2
    written = plot(args.csv, args.out or args.csv.parent / "plots", args.kernel)
    for path in written:
        print(path)
    if args.table:
        print(f"\n{'kernel':18s} {'dtype':9s} {'peer':14s} {'peer time / ours':>17s} {'cases':>6s}")
        for (kernel, dtype, peer), (value, n) in speedups(latest(read_rows(args.csv))).items():
            if not args.kernel or kernel in args.kernel:
                print(f"{kernel:18s} {dtype:9s} {peer:14s} {value:16.2f}x {n:6d}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
