"""--compare's ratios and the issue's goals; the offline figure they include (``bench/throughput.py``'s output
tokens/s for ours, run here on the same checkpoint and sizes, or read from its JSON)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from . import ROOT, log
from .runner import Run

# The goals as (label, key in the ratios, at least). Each ratio is "larger is better for ours".
GOALS = [
    ("output tokens/s at saturation, ours / transformers-cb", "saturation_output_tps:ours/transformers-cb", 3.0),
    ("median TTFT at a moderate rate, transformers-cb / ours (ours at most half)",
     "moderate_median_ttft:transformers-cb/ours", 2.0),
    ("ours' saturated output tokens/s / bench/throughput.py's offline figure", "saturation_output_tps:ours/offline",
     0.9),
]  # fmt: skip
OFFLINE_TIMEOUT_S = 1800.0


def ratios(runs: list[Run], peers: list[str], offline: dict | None) -> dict[str, float]:
    """ours vs each peer: saturated output tokens/s (ours / peer), median TTFT at the moderate rate (peer / ours),
    and ours' saturated output tokens/s against the offline figure."""
    by = {(r.server, r.label): r.summary for r in runs if r.summary and r.summary["completed"]}
    out = {}
    ours_sat, ours_mod = by.get(("ours", "saturation")), by.get(("ours", "moderate"))
    for peer in peers:
        sat, mod = by.get((peer, "saturation")), by.get((peer, "moderate"))
        if ours_sat and sat:
            out[f"saturation_output_tps:ours/{peer}"] = ours_sat["output_throughput"] / sat["output_throughput"]
        if ours_mod and mod and ours_mod["ttft_ms"]["median"]:
            out[f"moderate_median_ttft:{peer}/ours"] = mod["ttft_ms"]["median"] / ours_mod["ttft_ms"]["median"]
    if ours_sat and offline:
        out["saturation_output_tps:ours/offline"] = ours_sat["output_throughput"] / offline["output_tokens_per_s"]
    return out


def replica_ratios(runs: list[Run]) -> dict[str, float]:
    """Each ``ours-rayN`` server's output tokens/s over the first one's in the same run (rate)."""
    first: dict[str, tuple[str, float]] = {}
    out = {}
    for r in runs:
        if not r.server.startswith("ours-ray") or not (r.summary and r.summary["completed"]):
            continue
        base_server, base = first.setdefault(r.label, (r.server, r.summary["output_throughput"]))
        if r.server != base_server:
            out[f"{r.label}_output_tps:{r.server}/{base_server}"] = r.summary["output_throughput"] / base
    return out


def goals(ratios: dict[str, float]) -> list[dict]:
    """Each goal as PASS / MISS, or SKIP when its ratio could not be computed."""
    rows = []
    for label, key, target in GOALS:
        value = ratios.get(key)
        status = "SKIP" if value is None else ("PASS" if value >= target else "MISS")
        rows.append(dict(goal=f"{label} >= {target:g}x", key=key, ratio=value, status=status))
    return rows


def read_offline(path: str | Path) -> dict:
    """Ours' row of bench/throughput.py's random scenario in its JSON: output tokens/s and the workload."""
    report = json.loads(Path(path).read_text())
    scenario = report["scenarios"]["random"]
    ours = next(r for r in scenario["results"] if r["system"] == "ours")
    machine = report.get("machine", {})
    return dict(path=str(path), output_tokens_per_s=ours["output_tokens_per_s"], workload=scenario["workload"],
                machine=machine.get("cpu"), date=machine.get("date"))  # fmt: skip


def offline_command(args, checkpoint: Path, json_path: Path) -> list[str]:
    """``bench/throughput.py``'s random scenario, ours only (``--peers`` with no value), on this run's checkpoint,
    sizes, seed and engine flags."""
    cmd = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--model", str(checkpoint), "--scenario", "random",
           "--peers", "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--range-ratio", str(args.range_ratio), "--seed", str(args.seed),
           "--dtype", args.dtype, "--device", args.device, "--output-json", str(json_path)]  # fmt: skip
    flags = {"--backend": args.backend, "--max-num-seqs": args.max_num_seqs,
             "--max-num-batched-tokens": args.max_num_batched_tokens}  # fmt: skip
    for flag, value in flags.items():
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def run_offline(args, checkpoint: Path, log_dir: Path) -> tuple[dict | None, str | None]:
    """(the offline figure, None), or (None, why there is none): runs bench/throughput.py in a subprocess before any
    server starts, so the two figures come from the same machine in the same state."""
    json_path, log_path = log_dir / "offline_throughput.json", log_dir / "offline_throughput.log"
    cmd = offline_command(args, checkpoint, json_path)
    log(f"[offline] bench/throughput.py, ours only, the same checkpoint and sizes (log: {log_path})")
    with open(log_path, "wb") as out:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, timeout=OFFLINE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None, f"bench/throughput.py took over {OFFLINE_TIMEOUT_S:g} s"
    if proc.returncode != 0 or not json_path.is_file():
        return None, f"bench/throughput.py exited with code {proc.returncode}; see {log_path}"
    figure = read_offline(json_path)
    log(f"[offline] ours: {figure['output_tokens_per_s']:.1f} output tok/s")
    return figure, None


def offline_figure(
    args, checkpoint: Path | None, log_dir: Path, server_names: list[str]
) -> tuple[dict | None, str | None]:
    """(figure, None) or (None, why not) for --offline: ``run`` (the default with --compare), ``none``, or a path to
    throughput.py's JSON."""
    source = args.offline or ("run" if args.compare else "none")
    if source == "none":
        return None, "--offline none"
    if source != "run":
        return read_offline(source), None
    if "ours" not in server_names or checkpoint is None:
        return None, "ours is not launched here"
    if args.prompts_file:
        return None, "throughput.py's figure is for random prompts, not --prompts-file"
    return run_offline(args, checkpoint, log_dir)
