"""The ahead-of-time compile gate: the shipped kernels compile for sm_80/sm_90 without spills, and the gate
really fails on kernels that do not compile, spill registers, or need more shared memory than the chip has.

The gate compiles in a subprocess without TRITON_INTERPRET, so this file runs the same on CPU and GPU machines.
The deliberately bad kernels below are compiled by the gate's subprocess, which imports this module by name.
"""

from __future__ import annotations

import pytest
import triton
import triton.language as tl

from kernels.compile_gate import SMEM_LIMIT, SPEC_MODULES, main, run_gate
from kernels.specs import KernelSpec

ARCHS = (80, 90)


# ------------------------------------------------------------------------------------- kernels for the gate


@triton.jit
def _copy_kernel(
    x_ptr,  # pointer to the input, shape (n,)
    y_ptr,  # pointer to the output, shape (n,)
    n,  # number of elements
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _row_center_kernel(
    x_ptr,  # pointer to rows, shape (n_rows, BLOCK_SIZE), contiguous
    y_ptr,  # pointer to the output, same shape
    BLOCK_SIZE: tl.constexpr,  # row length: the whole row stays live in registers
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_SIZE
    x = tl.load(x_ptr + row + tl.arange(0, BLOCK_SIZE))
    y = x - tl.sum(x, axis=0) / BLOCK_SIZE  # x must survive the reduction: BLOCK_SIZE/32 registers per thread
    tl.store(y_ptr + row + tl.arange(0, BLOCK_SIZE), y)


@triton.jit
def _tile_dot_kernel(
    a_ptr,  # pointer to A, shape (BLOCK_M, BLOCK_K), contiguous
    b_ptr,  # pointer to B, shape (BLOCK_K, BLOCK_N), contiguous
    c_ptr,  # pointer to C = A @ B, shape (BLOCK_M, BLOCK_N), contiguous
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm, rn, rk = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + rm[:, None] * BLOCK_K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * BLOCK_N + rn[None, :])
    tl.store(c_ptr + rm[:, None] * BLOCK_N + rn[None, :], tl.dot(a, b).to(tl.float16))


def compile_specs() -> list[KernelSpec]:
    """Specs the gate compiles from this module: one good kernel and three that must fail."""
    copy_sig = {"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32"}
    row_sig = {"x_ptr": "*fp32", "y_ptr": "*fp32"}
    dot_sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16"}
    return [
        KernelSpec("good_copy BLOCK_SIZE=1024", _copy_kernel, copy_sig, {"BLOCK_SIZE": 1024}, num_warps=4),
        # tl.arange needs a power-of-two extent: the compiler rejects this.
        KernelSpec("bad_error BLOCK_SIZE=96", _copy_kernel, copy_sig, {"BLOCK_SIZE": 96}, num_warps=4),
        # 16384 fp32 values over 32 threads = 512 live registers per thread, above the 255 limit.
        KernelSpec("bad_spill BLOCK_SIZE=16384", _row_center_kernel, row_sig, {"BLOCK_SIZE": 16384}, num_warps=1),
        # One dot over the whole K: A (64x1024) and B (1024x128) fp16 tiles take 384 KiB of shared memory.
        KernelSpec(
            "bad_smem 64x128x1024",
            _tile_dot_kernel,
            dot_sig,
            {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 1024},
            num_warps=4,
            num_stages=1,
        ),
    ]


# ------------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def bad_rows():
    """The gate's rows for this module's specs, both archs."""
    rows = run_gate(archs=ARCHS, modules=[__name__], jobs=2)
    return {(r.kernel.split()[0], r.arch): r for r in rows}


@pytest.fixture(scope="module")
def shipped_rows():
    """A sample of every shipped kernel module: two specs each (its first and last config), both archs."""
    return run_gate(archs=ARCHS, modules=SPEC_MODULES, jobs=2, max_per_module=2)


@pytest.mark.parametrize("arch", ARCHS)
def test_gate_passes_a_good_kernel(bad_rows, arch):
    row = bad_rows[("good_copy", arch)]
    assert row.status == "PASS", row.reason
    assert row.regs is not None and 0 < row.regs <= 255
    assert row.spill_stores == 0 and row.spill_loads == 0
    assert row.shared is not None and row.compile_s > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_gate_fails_on_compile_error(bad_rows, arch):
    row = bad_rows[("bad_error", arch)]
    assert row.status == "FAIL"
    assert row.reason.startswith("compile error"), row.reason


@pytest.mark.parametrize("arch", ARCHS)
def test_gate_fails_on_spills(bad_rows, arch):
    row = bad_rows[("bad_spill", arch)]
    assert row.status == "FAIL"
    assert "spill" in row.reason and row.spill_stores > 0, row.reason


@pytest.mark.parametrize("arch", ARCHS)
def test_gate_fails_on_shared_memory(bad_rows, arch):
    row = bad_rows[("bad_smem", arch)]
    assert row.shared > SMEM_LIMIT[arch]
    assert row.status == "FAIL" and "shared memory" in row.reason, row.reason
    # the tensor-core scan sees mma.sync on sm_80 and warpgroup MMA on sm_90
    assert row.tensor_cores == {80: "HMMA", 90: "HGMMA"}[arch]


def test_main_exit_codes(capsys):
    assert main(["--module", __name__, "--filter", "good_copy", "--arch", "90", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "good_copy" in out and "compile gate PASS: 1 compiles" in out
    assert main(["--module", __name__, "--filter", "bad_error", "--arch", "80", "--jobs", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: compile error" in out and "compile gate FAIL" in out


def test_main_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main(["--arch", "75"])
    with pytest.raises(ValueError, match="jobs"):
        run_gate(jobs=0)


@pytest.mark.parametrize("module", SPEC_MODULES)
def test_shipped_kernels_compile_without_spills(shipped_rows, module):
    rows = [r for r in shipped_rows if r.module == module]
    assert {r.arch for r in rows} == set(ARCHS), f"{module}: no compiles for some arch: {rows}"
    failures = [f"{r.kernel} sm_{r.arch}: {r.reason}" for r in rows if r.status != "PASS"]
    assert not failures, "\n".join(failures)
    assert all(r.spill_stores == 0 and r.spill_loads == 0 for r in rows)
