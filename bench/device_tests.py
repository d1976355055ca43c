"""The test files that exercise kernels and the Triton model, run on the device by ``gpu_check`` (first, and the
tests that compile every autotune config last): pytest in a subprocess, killed after a timeout."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AUTOTUNE_ENV = "GPT2_TRITON_AUTOTUNE"  # kernels.utils.AUTOTUNE_ENV (read here without importing triton)
# The whole-model test (CUDA-graph decode) first: should the run hit its time cap, the end-to-end checks have run.
GPU_TESTS = (
    "engine/test_triton_model.py",
    "kernels/test_paged_attention.py",
    "kernels/test_kv_cache.py",
    "kernels/test_attention.py",
    "kernels/test_context_attention.py",
    "kernels/test_layernorm.py",
    "kernels/test_gelu.py",
    "kernels/test_quant.py",
    "kernels/test_linear.py",
    "kernels/test_lora.py",
    "engine/test_lora_triton.py",  # LoRA through the Triton backend (CUDA graphs) against the torch backend
    "bench/test_harness.py",  # the harness's own GPU tests (host_syncs, device_ms); its CPU tests take seconds
)
TEST_WORKERS = 8  # pytest-xdist processes sharing the GPU, when xdist is installed
EVERY_CONFIG_TESTS = "every_tuned"  # tests.helpers.tuning_every_config: ~100 compiles, run after the benchmarks
MIN_TEST_SECONDS = 30.0


def run_tests(files: list[str], select: str, timeout: float, dry_run: bool) -> dict:
    """``pytest -k select`` over ``files`` (under tests/), killed after ``timeout`` s; one row for gpu_check's JSON.

    A dry run only collects (the interpreter would take many minutes): it proves the plumbing. Correctness, not
    tuning: each autotuned kernel runs its first config (``GPT2_TRITON_AUTOTUNE=first``; the benchmarks tune, and
    validate the configs that win), else every new test shape would compile and time every config.
    """
    paths = [str(ROOT / "tests" / f) for f in files if (ROOT / "tests" / f).exists()]
    missing = [f for f in files if not (ROOT / "tests" / f).exists()]
    name = "pytest " + " ".join(Path(p).name for p in paths) + f" -k '{select}'"
    if not paths:
        return dict(section="tests", name=name, status="ERROR", reason=f"no test files found: {files}")
    # a file that cannot import (a package the image lacks) must not stop the others
    flags = ["-q", "-p", "no:cacheprovider", "--durations=10", "--continue-on-collection-errors"]
    cmd = [sys.executable, "-m", "pytest", *paths, "-k", select, *flags]
    if dry_run:
        cmd.append("--collect-only")
    elif importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(TEST_WORKERS)]  # compiling the kernels' variants dominates: spread it over CPU cores
    print(f"[tests] {name} (cap {timeout:.0f} s)", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, AUTOTUNE_ENV: "first"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=max(timeout, 1))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and anything it started: our own process group
        output, _ = proc.communicate()
        timed_out = True
    lines = [ln for ln in output.splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|errors?|tests? collected)", ln)), "")
    status = "TIMEOUT" if timed_out else ("OK" if proc.returncode == 0 else "FAIL")
    seconds = time.monotonic() - start
    print(f"[tests] {status}: {summary or '(no summary)'} in {seconds:.0f} s", flush=True)
    if status != "OK":
        print("\n".join(lines[-25:]), flush=True)
    return dict(section="tests", name=name, status=status, returncode=proc.returncode, seconds=seconds,
                summary=summary, missing_files=missing, output_tail="\n".join(lines[-40:]))  # fmt: skip
