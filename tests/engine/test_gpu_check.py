"""bench/gpu_check.py on a machine without a GPU: it says so (exit 2), and its dry run exercises every section."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env={**clean, **env},
                          cwd=ROOT, timeout=600)  # fmt: skip


def test_without_cuda_it_says_it_needs_one():
    r = run(CUDA_VISIBLE_DEVICES="")  # hides any GPU, so this holds on every machine
    assert r.returncode == 2, r.stdout + r.stderr
    assert "needs a CUDA GPU" in r.stdout and "imports OK" in r.stdout


def test_dry_run_writes_to_the_results_dir(tmp_path):
    """--results-dir (``$OUT`` on a lent device machine) receives the JSON; a quick section is enough."""
    r = run("--dry-run", "--skip-tests", "--sections", "gelu", "--results-dir", str(tmp_path), CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (written,) = tmp_path.glob("gpu_check_dryrun_*.json")
    assert [row["section"] for row in json.loads(written.read_text())["rows"]] == ["gelu"]


def test_dry_run_validates_every_section(tmp_path):
    """Tiny shapes under the interpreter: each kernel is checked against its reference and 'timed'."""
    out = tmp_path / "dry.json"
    r = run("--dry-run", "--skip-tests", "--out", str(out), CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    sections = {row["section"] for row in rows}
    kernels = {"layernorm", "decode", "prefill", "quant", "linear", "gelu", "store_kv", "lora"}
    assert kernels | {"engine", "decode_cfg", "splitk"} <= sections, sections
    assert all(row["status"] not in ("FAIL", "ERROR") for row in rows)


@pytest.mark.parametrize("budget, last", [("330", "OK"), ("0", "SKIP")])
def test_dry_run_runs_the_every_config_tests_last(tmp_path, budget, last):
    """The tests come first, except those compiling every autotune config (~100 compiles on a GPU): they run
    after the benchmarks, if the budget leaves time, else a SKIP row says how to run them."""
    out = tmp_path / "dry.json"
    r = run("--dry-run", "--sections", "gelu", "--budget", budget, "--out", str(out), CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    first, _, every = rows
    assert [row["section"] for row in rows] == ["tests", "gelu", "tests"]
    assert first["status"] == "OK" and every["status"] == last
    picked, total = map(int, re.match(r"(\d+)/(\d+) tests collected", first["summary"]).groups())
    if last == "OK":
        n_every, total_again = map(int, re.match(r"(\d+)/(\d+) tests collected", every["summary"]).groups())
        assert total == total_again and 0 < n_every == total - picked
    else:
        assert "pytest tests -k every_tuned" in every["reason"]
