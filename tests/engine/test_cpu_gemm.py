"""The hand-written CPU GEMM (engine/cpu_gemm.cpp through engine.cpu_gemm): exact against float64 for every weight
dtype and tile remainder, batch- and thread-invariant bit for bit, and a clean fall-back where it can't build."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from engine import cpu_gemm
from engine.torch_ops import CpuGemmWeight, TorchOps
from tests.helpers import rel_err

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL_DTYPES = FLOAT_DTYPES + [torch.int8]

needs_kernel = pytest.mark.skipif(
    not cpu_gemm.available(), reason="the CPU GEMM needs x86-64 with AVX2 and a C++ compiler"
)


def random_weight(dtype: torch.dtype, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A weight in ``dtype`` and, for int8, its per-row scales."""
    if dtype != torch.int8:
        return (torch.randn(n, k) * 0.1).to(dtype), None
    return torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) * 0.01 + 1e-4


def run(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    out = torch.full((x.shape[0], w.shape[0]), float("nan"))  # poisoned: every element must be written
    cpu_gemm.matmul(x, w, scales, out=out)
    return out


def int16_reference(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What the int8 kernel computes, in float64 from its own activation codes: each row of ``x`` rounded (half to
    even, in fp32 arithmetic as the kernel does it) to int16 codes at 32767 / max |row|."""
    most = x.abs().amax(dim=1, keepdim=True)
    codes = torch.round(x * (torch.tensor(32767.0) / most))
    x_scale = (most / torch.tensor(32767.0)).double()
    return (codes.double() @ w.double().t()) * x_scale * scales.double()


@needs_kernel
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_matches_float64(dtype):
    """Every tile remainder: M around the 4- and 8-row blocks (and M = 1's own tiles), N around the 3- and 6-row
    groups, K long enough for int8's int32 chunks to roll over."""
    m = random.choice([1, 2, 3, 4, 5, 7, 8, 9, 13, 17])
    n = random.randint(1, 40)
    k = 16 * random.randint(1, 40) if random.random() < 0.5 else 2048 + 16 * random.randint(1, 200)
    w, scales = random_weight(dtype, n, k)
    x = torch.randn(m, k)
    got = run(x, w, scales)
    if dtype == torch.int8:
        assert rel_err(got, int16_reference(x, w, scales)) < 1e-6  # the sums are exact; only fp32 scaling rounds
        exact = x.double() @ (w.double() * scales.double()[:, None]).t()
        assert rel_err(got, exact) < 2e-4  # and the int16 codes are close to the activations
    else:
        assert rel_err(got, x.double() @ w.double().t()) < 1e-5  # fp32 sums of the dtype's own values


@needs_kernel
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_a_row_gets_the_same_bits_alone_and_in_any_batch(dtype):
    k = 16 * random.randint(1, 64)
    w, scales = random_weight(dtype, random.randint(1, 50), k)
    x = torch.randn(random.randint(3, 19), k)
    batch = run(x, w, scales)
    for i in random.sample(range(x.shape[0]), 3):
        assert torch.equal(run(x[i : i + 1], w, scales), batch[i : i + 1])
        assert torch.equal(run(x[i:], w, scales), batch[i:])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_thread_count_does_not_change_the_bits(dtype):
    k = 16 * random.randint(1, 64)
    w, scales = random_weight(dtype, random.randint(20, 90), k)
    x = torch.randn(random.randint(1, 9), k)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(x, w, scales)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(run(x, w, scales), one)


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_int8_nonfinite_activations_poison_only_their_row(bad):
    k = 16 * random.randint(1, 32)
    w, scales = random_weight(torch.int8, 24, k)
    x = torch.randn(5, k)
    row = random.randrange(5)
    x[row, random.randrange(k)] = bad
    got = run(x, w, scales)
    assert got[row].isnan().all()
    others = [i for i in range(5) if i != row]
    assert torch.equal(got[others], run(x[others], w, scales))


@needs_kernel
def test_int8_sums_never_overflow():
    """The largest codes everywhere (+-32767 against +-127) over a K of 2^14: 8x past int32 in one sum, so the kernel
    must move its int32 sums to fp32 chunk by chunk."""
    k = 16384
    sign = random.choice([1, -1])
    w = torch.full((4, k), 127 * sign, dtype=torch.int8)
    scales = torch.rand(4) + 0.5
    x = torch.rand(2, 1) + 0.5 + torch.zeros(2, k)  # every activation its row's max
    assert rel_err(run(x, w, scales), x.double() @ (w.double() * scales.double()[:, None]).t()) < 1e-6


@needs_kernel
def test_int8_zero_row_gives_zeros():
    w, scales = random_weight(torch.int8, 12, 64)
    x = torch.randn(3, 64)
    x[1] = 0.0
    got = run(x, w, scales)
    assert torch.equal(got[1], torch.zeros(12))
    assert got[[0, 2]].abs().min() > 0


@needs_kernel
def test_bad_arguments():
    w, scales = random_weight(torch.int8, 8, 32)
    with pytest.raises(ValueError, match="does not match"):
        cpu_gemm.matmul(torch.randn(2, 48), w, scales)
    with pytest.raises(ValueError, match="scales go with int8"):
        cpu_gemm.matmul(torch.randn(2, 32), w)
    with pytest.raises(ValueError, match="scales go with int8"):
        cpu_gemm.matmul(torch.randn(2, 32), torch.randn(8, 32), scales)
    with pytest.raises(ValueError, match="scales must be"):
        cpu_gemm.matmul(torch.randn(2, 32), w, scales.double())
    with pytest.raises(ValueError, match="out must be"):
        cpu_gemm.matmul(torch.randn(2, 32), w, scales, out=torch.empty(2, 9))
    assert not cpu_gemm.supports(torch.randn(8, 40))  # K not a multiple of 16
    assert not cpu_gemm.supports(torch.randn(8, 32, dtype=torch.float64))


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """``cpu_gemm.library()`` rebuilt from scratch into an empty cache, and reloaded normally afterwards."""
    monkeypatch.setenv(cpu_gemm.CACHE_ENV, str(tmp_path))
    cpu_gemm.library.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    cpu_gemm.library.cache_clear()


@needs_kernel
def test_builds_once_into_the_cache(fresh_library, monkeypatch):
    assert cpu_gemm.available()
    (built,) = fresh_library.glob("cpu_gemm-*.so")
    cpu_gemm.library.cache_clear()

    def no_build(*args):
        raise AssertionError("rebuilt a library the cache holds")

    monkeypatch.setattr(cpu_gemm, "build", no_build)
    assert cpu_gemm.available()
    assert list(fresh_library.glob("*")) == [built]  # and no temporary file left beside it


def test_a_failed_build_warns_and_pytorch_runs_the_linears(fresh_library, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    monkeypatch.setattr(cpu_gemm, "_cpu_can_run", lambda: True)
    with pytest.warns(UserWarning, match="CPU GEMM kernel is not used"):
        assert not cpu_gemm.available()
    assert list(fresh_library.glob("*")) == []  # nothing half-written left in the cache
    w = torch.randn(64, 128)
    prepared = TorchOps().prepare_weight(w)
    assert not isinstance(prepared, CpuGemmWeight)
    x = torch.randn(3, 128)
    assert rel_err(TorchOps().linear(x, prepared), x.double() @ w.double().t()) < 1e-5


def test_switched_off_by_the_environment(fresh_library, monkeypatch):
    monkeypatch.setenv(cpu_gemm.SWITCH_ENV, "0")
    assert not cpu_gemm.available()
    assert not isinstance(TorchOps().prepare_weight(torch.randn(32, 64)), CpuGemmWeight)


@needs_kernel
def test_source_compiles_without_warnings(tmp_path):
    cxx = cpu_gemm.compiler()
    flags = [*cpu_gemm.FLAGS, "-Wall", "-Wextra", "-Werror"]
    r = subprocess.run(
        [cxx, *flags, str(cpu_gemm.SOURCE), "-o", str(tmp_path / "k.so")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


@needs_kernel
def test_runs_on_pytorchs_openmp_runtime():
    """The library's libgomp is the one torch loaded: one OpenMP thread pool in the process, not two."""
    code = (
        "import torch; from engine import cpu_gemm; assert cpu_gemm.available()\n"
        "maps = open('/proc/self/maps').read().splitlines()\n"
        "print(len({line.split()[-1] for line in maps if 'libgomp' in line}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"
