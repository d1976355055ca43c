"""What a benchmark prints and saves: vLLM's result block for a single run, tables for several, the comparison and
its goals, and the JSON with the machine it ran on."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from . import RESULTS, ROOT
from .compare import goals, ratios, replica_ratios
from .plot import plot
from .runner import Run, rate_str
from .servers import Server

LATENCY_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                  "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}  # fmt: skip
NOTES = [
    "TTFT: to the first SSE chunk with text; ITL: gaps between such chunks; TPOT: (e2e - TTFT) / (output tokens - 1); "
    "output tokens: usage.completion_tokens, else text chunks",
    "each run label has its own prompts (seed + run index): no server sees a prompt twice in one invocation "
    "(--reset-prefix-cache also forgets an earlier invocation's)",
    "throughputs count completed requests over the run's wall time, from the first send to the last answer",
]


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def stat_names(percentiles: list[float]) -> list[str]:
    return ["mean", "median"] + [f"p{q:g}" for q in percentiles]


def print_run_block(run: Run, percentiles: list[float]) -> None:
    """vLLM's result block for one run."""
    s = run.summary
    title = f" Serving Benchmark Result: {run.server}, {run.label} "
    print(f"{title:=^{max(60, len(title) + 6)}}")
    lines = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
             ("Request rate configured (req/s)", rate_str(run.rate)), ("Peak requests in flight", run.peak_in_flight),
             ("Benchmark duration (s)", f"{s['duration_s']:.2f}"), ("Total input tokens", s["total_input_tokens"]),
             ("Total generated tokens", s["total_output_tokens"]),
             ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
             ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
             ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}")]  # fmt: skip
    if s["request_goodput"] is not None:
        lines.append(("Request goodput (req/s)", f"{s['request_goodput']:.2f}"))
    if s["cached_prompt_tokens"] is not None:
        lines.append(("Prefix cache hit tokens", s["cached_prompt_tokens"]))
    lines += [(f"Error ({count}x)", error) for error, count in s["errors"].items()]
    for name, value in lines:
        print(f"{name + ':':<40}{value:<10}")
    for key, title in LATENCY_TITLES.items():
        print(f"{' ' + title + ' ':-^60}")
        for stat in stat_names(percentiles):
            name = stat.capitalize() if stat in ("mean", "median") else stat.upper()
            print(f"{f'{name} {key.upper()} (ms):':<40}{fmt_ms(s[f'{key}_ms'][stat]):<10}")
    print("=" * 60)


def throughput_row(r: Run, width: int) -> str:
    rate = "-" if math.isnan(r.rate) else ("inf" if math.isinf(r.rate) else f"{r.rate:.3g}")
    head = f"  {r.server:<{width}} {r.label:<12} {rate:>6}"
    if r.summary is None:
        return f"{head}  not run: {r.error}"
    s = r.summary
    goodput = "-" if s["request_goodput"] is None else f"{s['request_goodput']:.2f}"
    checks = f"{s['full_length']}/{s['completed']} full length"
    if s["prompt_tokens_mismatched"]:
        checks += f", {s['prompt_tokens_mismatched']} prompt-length mismatches"
    if s["cached_prompt_tokens"]:
        checks += f", {s['cached_prompt_tokens']}/{s['total_input_tokens']} prompt tokens from the prefix cache"
    return (f"{head} {s['completed']:>4} {s['failed']:>4} {s['duration_s']:>7.1f} {s['request_throughput']:>6.2f} "
            f"{s['output_throughput']:>9.1f} {s['total_token_throughput']:>9.1f} {goodput:>7}  {checks}")  # fmt: skip


def print_tables(runs: list[Run], percentiles: list[float]) -> None:
    """Every run in two tables: throughput, then latency (mean / median / p-th percentiles, ms)."""
    width = max(len(r.server) for r in runs)
    print(f"\n  {'server':<{width}} {'run':<12} {'rate':>6} {'ok':>4} {'fail':>4} {'time s':>7} {'req/s':>6} "
          f"{'out tok/s':>9} {'tot tok/s':>9} {'goodput':>7}  checks")  # fmt: skip
    for r in runs:
        print(throughput_row(r, width))
    stats = stat_names(percentiles)
    metrics = {"TTFT": "ttft_ms", "TPOT": "tpot_ms", "ITL": "itl_ms", "E2E": "e2el_ms"}
    rows = [(r, [" / ".join(fmt_ms(r.summary[key][s]) for s in stats) for key in metrics.values()])
            for r in runs if r.summary is not None]  # fmt: skip
    widths = [max([len(name)] + [len(cells[i]) for _, cells in rows]) for i, name in enumerate(metrics)]
    print(f"\n  latency, ms ({' / '.join('med' if s == 'median' else s for s in stats)})")
    print(f"  {'server':<{width}} {'run':<12} " + "  ".join(f"{m:<{w}}" for m, w in zip(metrics, widths)))
    for r, cells in rows:
        print(f"  {r.server:<{width}} {r.label:<12} " + "  ".join(f"{c:<{w}}" for c, w in zip(cells, widths)))


def print_comparison(ratios: dict[str, float], goal_rows: list[dict], servers: list[Server], offline: dict | None,
                     offline_missing: str | None, args) -> None:  # fmt: skip
    """Whether the greedy warm-up completions agree, the ratios, the offline figure, and the goals."""
    warm = {s.name: s.warmup["text"] for s in servers if s.warmup and s.warmup["ok"]}
    if "ours" in warm and len(warm) > 1:
        same = ", ".join(f"{k} {'same' if t == warm['ours'] else 'DIFFERENT'}" for k, t in warm.items() if k != "ours")
        print(f"\n  greedy warm-up completion vs ours: {same}")
    print()
    for key, value in ratios.items():
        print(f"  {key}: {value:.2f}x")
    if offline:
        w = offline["workload"]
        print(f"  offline figure: {offline['output_tokens_per_s']:.1f} output tok/s from {offline['path']} "
              f"({w.get('num_prompts')} prompts, input mean {w.get('input_len_mean', 0):.1f}, output mean "
              f"{w.get('output_len_mean', 0):.1f})")  # fmt: skip
    else:
        print(f"  no offline figure: {offline_missing}")
    print(
        f"\ngoals (set for gpt2, random weights, fp32, CPU; this run: {args.checkpoint}, {args.dtype}, {args.device}):"
    )
    for g in goal_rows:
        value = "-" if g["ratio"] is None else f"{g['ratio']:.2f}x"
        print(f"  {g['status']:<4}  {g['goal']}: {value}")


def git_state() -> tuple[str, bool]:
    """(commit, whether tracked files differ from it)."""

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except OSError:
        return "", False


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def banner(machine: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    dirty = " (dirty)" if machine["git_dirty"] else ""
    return (f"gpt2-triton serving benchmark: {machine['cpu']}, {machine['cores']} cores; {versions}; "
            f"{machine['date']}, commit {machine['git_commit'][:10]}{dirty}")  # fmt: skip


def machine_info() -> dict:
    """The CPU, versions, date and commit printed with the results and saved in the JSON."""
    versions = {}
    for package in ("torch", "transformers", "httpx", "httpx2", "fastapi", "uvicorn"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    commit, dirty = git_state()
    return dict(cpu=cpu_name(), cores=os.cpu_count(), load_average=os.getloadavg(), python=platform.python_version(),
                versions=versions, date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                git_commit=commit, git_dirty=dirty)  # fmt: skip


def jsonable(obj):
    """Infinite / NaN floats as strings (JSON has neither)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else None)
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


def json_path(output_json: str | None, machine: dict) -> Path:
    """--output-json, else bench/results/serve_<cpu>_<date>.json."""
    if output_json:
        return Path(output_json)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", machine["cpu"]).strip("-").lower()
    return RESULTS / f"serve_{slug}_{_dt.datetime.now():%Y%m%d-%H%M%S}.json"


def write_json(path: Path, result: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(result), indent=2) + "\n")
    return path


def report_results(args, machine: dict, servers: list[Server], runs: list[Run], workloads: dict, offline: dict | None,
                   offline_missing: str | None) -> None:  # fmt: skip
    """Print the tables (vLLM's block for a single run), ratios and goals; write the JSON and the plot."""
    for s in servers:
        if s.error:
            print(f"\n{s.name}: not benchmarked: {s.error}")
    done = [r for r in runs if r.summary is not None]
    if len(runs) == 1 and done:
        print()
        print_run_block(done[0], args.percentiles)
    elif runs:
        print_tables(runs, args.percentiles)
    comparison = None
    if args.compare:
        found = ratios(runs, [s.name for s in servers if s.name != "ours"], offline)
        comparison = dict(ratios=found, goals=goals(found), offline=offline, offline_missing=offline_missing)
        print_comparison(found, comparison["goals"], servers, offline, offline_missing, args)
    scaling = replica_ratios(runs)
    for key, value in scaling.items():
        print(f"  {key}: {value:.2f}x")
    machine["load_average_end"] = os.getloadavg()
    result = dict(machine=machine, args=vars(args), checkpoint=None if args.base_url else args.checkpoint,
                  workloads={k: w.describe() for k, w in workloads.items()}, servers=[asdict(s) for s in servers],
                  runs=[r.as_dict() for r in runs], comparison=comparison, replica_ratios=scaling,
                  notes=NOTES)  # fmt: skip
    path = write_json(json_path(args.output_json, machine), result)
    print(f"\nJSON: {path}")
    if args.plot and (args.sweep or args.compare) and done:
        png = plot(
            runs, path.with_suffix(".png"), f"{args.checkpoint}, {args.dtype}, {machine['cpu']}, {machine['date']}"
        )
        if png:
            print(f"plot: {png}")
