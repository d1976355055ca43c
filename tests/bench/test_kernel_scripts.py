"""Every script of bench/kernels/ as a dry run (CPU, Triton interpreter, tiny sizes, fp16 and bf16): each provider of
each case is validated against the kernel's reference and timed, and the CSV holds what bench/plot.py reads.
Timings are never asserted. Then bench/plot.py draws that CSV."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import plot
from bench.harness import COLUMNS, OURS, append_rows, read_rows

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "bench" / "kernels"
# script -> (tiny arguments, the providers of its cases, its sweeps)
PEERS = [OURS, "torch", "torch.compile"]
PAGED = [OURS, "torch", "torch-paged", "torch.compile"]
RUNS = {
    "layernorm": (["--rows", "7", "--widths", "1600"], PEERS, {"rows", "width"}),
    "gelu": (["--rows", "7"], PEERS, {"rows"}),
    "linear": (["--layers", "fc+gelu", "attn_out+res", "--m", "3"], PEERS, {"M"}),
    "quant": (["--layers", "mlp_out+res", "--m", "1"], PEERS, {"M"}),
    "prefill_attention": (["--seq-len", "16", "--tokens", "32"], PEERS, {"seq_len"}),
    "paged_decode": (["--batch", "2", "--context", "17"], PAGED, {"batch", "context"}),
    "store_kv": (["--tokens", "5"], PEERS, {"tokens"}),
    "context_attention": (["--batch", "2", "--context", "7", "--chunk", "3"], PAGED, {"context", "chunk"}),
    "lora": (["--rows", "9", "--slots", "3", "--rank", "8"], PEERS, {"rows"}),
}


def load_script(name: str):
    """A bench/kernels/ script as a module, from its file, as ``python bench/kernels/<name>.py`` would run it."""
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_main(name: str, argv: list[str]) -> int:
    """Run a script's main: in this process under the interpreter (a CPU-only machine: tests/conftest.py started
    it), else in its own process with the GPU hidden, where it can start the interpreter before importing triton."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        r = subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *argv], env=env, timeout=600)
        return r.returncode
    module = load_script(name)
    return module.main(name, module.__doc__, module.cases, argv, module.add_arguments)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_dry_run_validates_every_provider(name, tmp_path):
    args, providers, sweeps = RUNS[name]
    out = tmp_path / f"{name}.csv"
    assert script_main(name, ["--dry-run", *args, "--out", str(out)]) == 0
    rows = read_rows(out)
    assert rows and set(rows[0]) == set(COLUMNS)
    assert {r["dtype"] for r in rows} == {"float16", "bfloat16"}
    assert {r["sweep"] for r in rows} == sweeps
    for case in {r["name"] for r in rows}:
        for dtype in ("float16", "bfloat16"):
            got = [r for r in rows if r["name"] == case and r["dtype"] == dtype]
            assert [r["provider"] for r in got] == providers, (case, dtype)
            bad = [(r["provider"], r["reason"]) for r in got if r["status"] != "OK"]
            assert not bad, (case, dtype, bad)
            assert all(r["ms"] > 0 and r["rel_err"] <= r["tol"] for r in got)
            assert all(r["pct_roofline"] and r["copy_gbps"] and r["matmul_tflops"] for r in got)


def test_split_k_sweep_dry_run(tmp_path):
    """``linear.py --split-k``: every forced depth that keeps 64 of K per split, against the launcher's own pick
    (1 on the CPU), both validated."""
    out = tmp_path / "splitk.csv"
    assert script_main("linear", ["--dry-run", "--split-k", "--layers", "mlp_out+res", "--out", str(out)]) == 0
    rows = read_rows(out)
    assert {r["sweep"] for r in rows} == {"split_k"} and {r["x"] for r in rows} == {2.0, 4.0}  # K = 256
    for dtype in ("float16", "bfloat16"):
        got = [r for r in rows if r["dtype"] == dtype]
        assert [r["provider"] for r in got] == ["triton-split", OURS] * 2
        assert all(r["status"] == "OK" and r["ms"] > 0 and r["rel_err"] <= r["tol"] for r in got)


def test_script_runs_alone(tmp_path):
    """``python bench/kernels/store_kv.py --dry-run`` in its own process, without TRITON_INTERPRET set."""
    out = tmp_path / "kernels.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(SCRIPTS / "store_kv.py"), "--dry-run", "--tokens", "3", "--dtype", "float16"]
    r = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = read_rows(out)
    assert [r["provider"] for r in rows] == PEERS and all(r["status"] == "OK" for r in rows)
    assert "rows appended" in r.stdout and "store_kv T=3" in r.stdout


def test_without_cuda_a_script_says_it_needs_one(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    interpreter = os.environ.get("TRITON_INTERPRET")
    module = load_script("gelu")
    assert module.main("gelu", module.__doc__, module.cases, [], module.add_arguments) == 2  # no GPU, no --dry-run
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert os.environ.get("TRITON_INTERPRET") == interpreter  # it left the interpreter switch alone


def test_plot_draws_every_sweep_from_a_dry_run(tmp_path):
    out = tmp_path / "kernels.csv"  # two scripts appending to one CSV
    assert script_main("store_kv", ["--dry-run", "--tokens", "1", "5", "--out", str(out)]) == 0
    assert script_main("gelu", ["--dry-run", "--rows", "2", "--dtype", "float16", "--out", str(out)]) == 0
    assert plot.main([str(out), "--out", str(tmp_path / "plots"), "--table"]) == 0
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["gelu_rows_cpu-interpreter-cpu.png", "store_kv_tokens_cpu-interpreter-cpu.png"]
    for p in (tmp_path / "plots").iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    rows = plot.latest(read_rows(out))
    lines, roof = plot.series([r for r in rows if r["kernel"] == "store_kv" and r["dtype"] == "bfloat16"], "gbps")
    assert list(lines) == PEERS  # ours first, then the peers
    assert [x for x, _ in lines[OURS]] == [1.0, 5.0] and [x for x, _ in roof] == [1.0, 5.0]
    assert all(y > 0 for _, y in roof)


def test_plot_keeps_the_latest_measurement_of_each_point(tmp_path):
    base = dict.fromkeys(COLUMNS)
    base.update(gpu="H200", kernel="gelu", sweep="rows", variant="w", dtype="float16", status="OK", provider=OURS,
                flops=0.0, bytes=1e6, roofline_ms=0.001)  # fmt: skip
    rows = [
        dict(base, date="2026-11-30T10:00:00+00:00", x=1, ms=1.0, gbps=1.0),
        dict(base, date="2026-11-30T12:00:00+01:00", x=1, ms=0.5, gbps=2.0),  # 11:00 UTC: the latest
        dict(base, date="2026-11-30T09:00:00+00:00", x=4, ms=0.5, gbps=8.0),
        dict(base, date="2026-11-30T10:00:00+00:00", x=4, ms=1.0, gbps=4.0, status="FAIL"),  # latest, not drawn
    ]
    path = tmp_path / "rows.csv"
    append_rows(path, rows)
    lines, roof = plot.series(plot.latest(read_rows(path)), "gbps")
    assert lines == {OURS: [(1.0, 2.0)]}
    assert roof == [(1.0, pytest.approx(1000.0))]  # 1 MB in 1 us
    assert plot.main([str(tmp_path / "missing.csv")]) == 2


def test_plot_leaves_out_what_never_ran(tmp_path):
    """A variant whose cases were all skipped (time budget) or failed gets no empty panel; a sweep with nothing
    measured gets no figure."""
    base = dict.fromkeys(COLUMNS)
    base.update(gpu="H200", kernel="linear", dtype="float16", provider=OURS, date="2026-11-30T10:00:00+00:00",
                flops=2e9, bytes=1e6, roofline_ms=0.001, ms=0.01, tflops=200.0, gbps=100.0)  # fmt: skip
    rows = [dict(base, sweep="m", variant="qkv", x=x, status="OK") for x in (1, 4)]
    rows += [dict(base, sweep="m", variant=v, x=1, status=s) for v, s in (("fc", "SKIP"), ("lm_head", "FAIL"))]
    rows += [dict(base, sweep="k", variant="qkv", x=1, status="SKIP")]
    groups = plot.figures(plot.latest(rows))
    assert list(groups) == [("H200", "linear", "m")]
    assert {r["variant"] for r in groups[("H200", "linear", "m")]} == {"qkv"}
