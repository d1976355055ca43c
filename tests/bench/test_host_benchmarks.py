"""The pytest-benchmark suites of bench/ (host side of a step, tokenizer, block manager) still run: each benchmark
once, with its checks (``--benchmark-disable``); and ``--benchmark-only`` times them despite pyproject's
``--benchmark-disable`` (bench/conftest.py). Their timings are read by people, never asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def pytest_bench(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    cmd = [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def test_every_benchmark_runs_once_with_its_checks():
    r = pytest_bench("--benchmark-disable")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    passed = int(re.search(r"(\d+) passed", r.stdout).group(1))
    assert passed >= 20 and "failed" not in r.stdout and "error" not in r.stdout.lower()


def test_benchmark_only_times_them():
    r = pytest_bench("-k", "match_prefix", "--benchmark-only", "--benchmark-max-time=0.05")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "benchmark 'blocks: prefix-cache lookup of a 512-token prompt': 2 tests" in r.stdout
    assert re.search(r"test_match_prefix\[all-cached\]\s+[\d,.]+", r.stdout)
