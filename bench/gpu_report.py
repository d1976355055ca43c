"""``gpu_check``'s report: a row per case (ours against one peer), the goals scored from the rows, the summary
table, and the JSON they are saved in."""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import Bench, Result


def pair_row(bench: Bench, section: str, result: Result, ours: str, peer: str) -> dict:
    """The JSON row of one case: ours' and the peer's times, their ratio, rates, % of copy bandwidth and roofline.

    ``status``: OK, FAIL (a validation failed: ours', or the peer's, named in ``reason``), ERROR, SKIP."""
    case, t = result.case, result.timings
    row = dict(section=section, name=case.name, **case.params)
    mine, theirs = t.get(ours), t.get(peer)
    if mine is not None and mine.err is not None:
        row.update(rel_err=mine.err, tol=result.tol)
    for who, tm in ((ours, mine), (peer, theirs)):
        if tm is None or tm.status != "OK":
            status = "SKIP" if tm is None or tm.status == "SKIP" else tm.status
            reason = tm.reason if tm is not None else "not measured"
            row.update(status=status, reason=reason if who == ours else f"peer {who}: {reason}")
            if result.traceback:
                row["traceback"] = result.traceback
            return row
    row.update(status="OK", ours_ms=mine.ms, peer_ms=theirs.ms, speedup=theirs.ms / mine.ms, method=result.method)
    if case.flops:
        row.update(tflops=case.flops / mine.ms * 1e-9, peer_tflops=case.flops / theirs.ms * 1e-9)
    if case.nbytes:
        row.update(gbps=case.nbytes / mine.ms * 1e-6, peer_gbps=case.nbytes / theirs.ms * 1e-6)
        if bench.copy_gbps:
            row["pct_copy_bw"] = 100.0 * row["gbps"] / bench.copy_gbps
    floor = bench.roofline_ms(case)
    if floor:
        row.update(roofline_ms=floor, pct_roofline=100.0 * floor / mine.ms)
    return row


@dataclass(frozen=True)
class Goal:
    """A performance goal: ``reduce`` of ``key`` over the OK rows of ``section`` that ``where`` picks, >= ``target``."""

    name: str
    section: str
    key: str
    reduce: Callable[[list[float]], float]
    target: float
    unit: str
    where: Callable[[dict, list[dict]], bool] = lambda row, section_rows: True


def geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def score(goals: list[Goal], rows: list[dict]) -> list[dict]:
    """PASS, MISS, PARTIAL (met on the cases that ran, others failed or were skipped), ERROR (none ran), N/A."""
    scored = []
    for g in goals:
        section = [r for r in rows if r["section"] == g.section]
        tried = [r for r in section if g.where(r, section)]
        good = [r[g.key] for r in tried if r.get("status") == "OK" and r.get(g.key) is not None]
        value = g.reduce(good) if good else None
        if value is None:  # nothing ran, or it ran without what the goal needs (e.g. no copy section)
            verdict = "ERROR" if tried and not any(r.get("status") == "OK" for r in tried) else "N/A"
        elif value < g.target:
            verdict = "MISS"
        else:
            verdict = "PASS" if len(good) == len(tried) else "PARTIAL"
        scored.append(dict(goal=g.name, value=value, target=g.target, unit=g.unit, verdict=verdict, cases=len(tried)))
    return scored


@dataclass
class Report:
    """Rows and metadata, rewritten to ``path`` after every section: a crash keeps what was measured."""

    path: Path
    meta: dict
    rows: list[dict] = field(default_factory=list)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.meta, "rows": self.rows}, indent=1, default=str))
        os.replace(tmp, self.path)  # atomically: a crash mid-write keeps the last good file


def print_summary(report: Report, bench: Bench, scored: list[dict]) -> None:
    """The short table printed last: one line per section, then the goals."""
    meta = report.meta
    print("\n== gpu_check summary " + ("(DRY RUN: interpreter on CPU, timings meaningless) " if bench.dry_run else ""))
    print(f"{meta.get('gpu')} | torch {meta.get('torch')} | triton {meta.get('triton')} | {meta['date']}")
    if bench.copy_gbps or bench.matmul_tflops:
        rates = ", ".join(f"{v:.0f}" for v in bench.matmul_tflops.values()) or "0"
        print(f"ceilings: copy {bench.copy_gbps or 0:.0f} GB/s, matmul {rates} TFLOP/s")
    print(f"{'section':10s} {'cases':>5s} {'ok':>4s} {'bad':>4s}  {'geomean x peer':>14s}  best / worst case")
    for sec in dict.fromkeys(r["section"] for r in report.rows):
        rs = [r for r in report.rows if r["section"] == sec]
        if sec == "tests":
            for r in rs:
                note, select = r.get("summary") or r.get("reason", ""), r["name"].split(" -k ")[-1]
                print(f"{sec:10s} {'':>5s} {'':>4s} {'':>4s}  {r['status']:>14s}  {note} ({select})")
            continue
        good = sorted((r for r in rs if r.get("status") == "OK"), key=lambda r: r["speedup"])
        gm = geomean([r["speedup"] for r in good])
        ends = (
            f"{good[-1]['name']} x{good[-1]['speedup']:.2f} / {good[0]['name']} x{good[0]['speedup']:.2f}"
            if good
            else ""
        )
        gms = f"{gm:.2f}" if gm else "-"
        print(f"{sec:10s} {len(rs):5d} {len(good):4d} {len(rs) - len(good):4d}  {gms:>14s}  {ends}")
    print("\ngoal                                          value     target  verdict")
    for g in scored:
        val = "-" if g["value"] is None else f"{g['value']:.2f}{g['unit']}"
        print(f"{g['goal']:44s} {val:>9s} {g['target']:>7.1f}{g['unit']}  {g['verdict']}")
    print(f"\nrows written to {report.path}")


def describe_row(r: dict) -> str:
    """One console line of a row: both times, the ratio, the rate, the % of roofline, the error."""
    if r["status"] != "OK":
        return f"{r['name']:44s} {r['status']} {r.get('reason', '')[:200]}"
    perf = f"{r['tflops']:7.2f} TF/s" if "tflops" in r and "gbps" not in r else f"{r.get('gbps', 0):7.0f} GB/s"
    roof = f"  {r['pct_roofline']:5.1f}% roofline" if "pct_roofline" in r else ""
    return (f"{r['name']:44s} ours {r['ours_ms'] * 1e3:9.1f} us  peer {r['peer_ms'] * 1e3:9.1f} us  "
            f"x{r['speedup']:.2f}  {perf}{roof}  err {r.get('rel_err', 0):.1e}")  # fmt: skip


def kernel_modules() -> list[str]:
    """Every op family's module (``kernels.KERNEL_MODULES``, the one list of them)."""
    from kernels import KERNEL_MODULES

    return [f"kernels.{name}" for name in KERNEL_MODULES]


def autotune_picks() -> dict[str, dict[str, str]]:
    """The config each autotuned kernel chose, per key: what to ship as defaults, read back after a GPU run."""
    from triton.runtime.autotuner import Autotuner

    picks, seen = {}, set()
    for mod in kernel_modules():
        for attr, obj in vars(importlib.import_module(mod)).items():
            if isinstance(obj, Autotuner) and id(obj) not in seen:
                seen.add(id(obj))
                picks[attr.strip("_")] = {str(key): str(cfg) for key, cfg in getattr(obj, "cache", {}).items()}
    return picks
