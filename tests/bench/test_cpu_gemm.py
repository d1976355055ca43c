"""bench/cpu_gemm.py on small settings: every dtype and M is checked against float64 and timed, the JSON holds what
the table shows, bad arguments are one line and exit 2. Rates are printed, never asserted."""

from __future__ import annotations

import json
import random

import pytest

from bench import cpu_gemm
from engine import cpu_kernels

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels need x86-64 with AVX2")


@needs_kernel
def test_every_dtype_and_m_is_checked_timed_and_saved(tmp_path, capsys):
    ms = sorted(random.sample(range(1, 20), 2))
    out = tmp_path / "gemm.json"
    argv = ["--dtypes", *cpu_gemm.DTYPES, "--m", *map(str, ms), "--rounds", "1", "--ms", "1", "--threads", "1",
            "--output-json", str(out)]  # fmt: skip
    assert cpu_gemm.main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:-1]]
    assert [(r[0], int(r[1]), r[-1]) for r in rows] == [(d, m, "ok") for d in cpu_gemm.DTYPES for m in ms]
    saved = json.loads(out.read_text())
    assert [(r["dtype"], r["m"]) for r in saved["rows"]] == [(d, m) for d in cpu_gemm.DTYPES for m in ms]
    assert saved["settings"]["shapes"] == {k: list(v) for k, v in cpu_gemm.block_shapes("gpt2").items()}
    for row in saved["rows"]:
        assert set(row["rel_err"]) == set(cpu_gemm.block_shapes("gpt2")) and all(t > 0 for t in row["seconds"]["ours"])


def test_the_shapes_are_the_presets_block_linears():
    assert cpu_gemm.block_shapes("gpt2-medium") == {
        "qkv": (3072, 1024),
        "attn_out": (1024, 1024),
        "mlp_in": (4096, 1024),
        "mlp_out": (1024, 4096),
    }


@pytest.mark.parametrize("argv", [["--m", "0"], ["--rounds", "0"], ["--dtypes", "int8"], ["--model-size", "gpt5"]])
def test_bad_arguments_exit_2(argv, capsys):
    assert cpu_gemm.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: " in err[0]
