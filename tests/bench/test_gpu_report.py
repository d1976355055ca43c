"""bench/gpu_report.py: gpu_check's rows from the harness's results, and the goals scored from rows."""

from __future__ import annotations

import pytest
import torch

from bench.gpu_report import Goal, geomean, pair_row, score
from bench.harness import Bench, Case, Result, Timing


def result(ours: Timing, peer: Timing, **case_kw) -> Result:
    case = Case("linear", "qkv M=1", torch.float16, lambda: None, params=dict(m=1, layer="qkv"), **case_kw)
    return Result(case, 5e-3, {"triton": ours, "torch": peer}, method="do_bench")


def test_pair_row_has_both_times_rates_and_roofline():
    bench = Bench(torch.device("cpu"), dry_run=True, copy_gbps=1000.0, matmul_tflops={"float16": 100.0})
    res = result(Timing("OK", ms=0.02, err=1e-3), Timing("OK", ms=0.03, err=2e-3), flops=1e9, nbytes=1e7)
    row = pair_row(bench, "linear", res, "triton", "torch")
    assert row["section"] == "linear" and row["name"] == "qkv M=1" and row["m"] == 1 and row["layer"] == "qkv"
    assert row["status"] == "OK" and row["speedup"] == pytest.approx(1.5) and row["rel_err"] == 1e-3
    assert row["tflops"] == pytest.approx(50.0) and row["peer_tflops"] == pytest.approx(1e9 / 0.03 * 1e-9)
    assert row["gbps"] == pytest.approx(500.0) and row["pct_copy_bw"] == pytest.approx(50.0)
    assert row["roofline_ms"] == pytest.approx(0.01) and row["pct_roofline"] == pytest.approx(50.0)


def test_pair_row_reports_who_failed():
    bench = Bench(torch.device("cpu"), dry_run=True)
    row = pair_row(bench, "linear", result(Timing("FAIL", err=0.1, reason="rel err 0.1 > tol 5e-3"),
                                           Timing("OK", ms=1.0, err=0.0)), "triton", "torch")  # fmt: skip
    assert row["status"] == "FAIL" and row["rel_err"] == 0.1 and "ours_ms" not in row
    row = pair_row(bench, "linear", result(Timing("OK", ms=1.0, err=0.0), Timing("ERROR", reason="boom")),
                   "triton", "torch")  # fmt: skip
    assert row["status"] == "ERROR" and row["reason"] == "peer torch: boom"
    skipped = Result(result(Timing("OK"), Timing("OK")).case, 5e-3, {"triton": Timing("SKIP", reason="budget")})
    assert pair_row(bench, "linear", skipped, "triton", "torch")["status"] == "SKIP"


def test_goals_score_pass_miss_partial_error_and_na():
    goal = Goal("fast", "linear", "speedup", geomean, 1.0, "x")
    ok = lambda x: dict(section="linear", status="OK", speedup=x)
    assert score([goal], [ok(2.0), ok(0.5)])[0]["verdict"] == "PASS"  # geomean exactly 1.0
    assert score([goal], [ok(2.0), ok(0.4)])[0]["verdict"] == "MISS"
    assert score([goal], [ok(2.0), dict(section="linear", status="FAIL")])[0]["verdict"] == "PARTIAL"
    assert score([goal], [dict(section="linear", status="ERROR")])[0]["verdict"] == "ERROR"
    assert score([goal], [])[0]["verdict"] == "N/A"
    picky = Goal("big", "decode", "pct", min, 70.0, "%", lambda r, rows: r["batch"] >= max(x["batch"] for x in rows))
    rows = [dict(section="decode", status="OK", pct=10.0, batch=1), dict(section="decode", status="OK", pct=80.0,
                                                                         batch=64)]  # fmt: skip
    (scored,) = score([picky], rows)
    assert scored["verdict"] == "PASS" and scored["value"] == 80.0 and scored["cases"] == 1
