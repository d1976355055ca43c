"""The torch backend's CPU GEMM, hand-written in C++ (``engine/cpu_gemm.cpp``): ``x @ W.T`` in fp32 for fp32
activations against fp32, fp16, bf16 or int8 weights, with AVX2 + FMA + F16C intrinsics.

Why: decode on a CPU reads every weight once a token, so a step lasts as long as its GEMVs take to stream the
weights, and PyTorch's CPU GEMMs leave bandwidth unused at small M. Measured on gpt2-medium's 96 block GEMMs
(2 Zen 3 cores, AVX2, 2026-12-01, best of three; PyTorch's path in parentheses):

=========  ==============  =============  ================================
weights    M = 1           M = 8          PyTorch's path
=========  ==============  =============  ================================
fp32       35-43 ms        61-67 ms       (45-63 / 85-100, oneDNN packed)
fp16       24-31 ms        52-56 ms       (29-36 / 60-67, fbgemm packed)
int8       12-16 ms        35 ms          (29-36 / 80, _weight_int8pack_mm)
=========  ==============  =============  ================================

At M = 64 and 256 (prefill) it is within 10% of oneDNN and fbgemm, and twice as fast as ``_weight_int8pack_mm``.
int8 multiplies int16 activation codes (rounded per row, 15 bits: far finer than the bf16 activations
``_weight_int8pack_mm`` needs) with the weight codes in exact int32 sums.

The library is built on first use with the system's C++ compiler (``$CXX``, else ``c++``), about 3 s, into
``$GPT2_TRITON_CACHE_DIR`` (default ``~/.cache/gpt2-triton``) under a name hashed from the source, the flags and
the compiler, then loaded with ctypes. It runs its loops on PyTorch's own OpenMP threads (``torch.get_num_threads()``
of them): torch's wheels ship ``libgomp.so.1``, which the library's own ``libgomp.so.1`` dependency resolves to.
Where it can't run (not x86-64 with AVX2, no compiler, a failed build, or ``GPT2_TRITON_CPU_GEMM=0``),
:func:`available` is False, one warning says why if a build failed, and the torch backend uses PyTorch's GEMMs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_gemm.cpp")
FLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}  # cpu_gemm.cpp's enum Kind
K_MULTIPLE = 16  # K must be a multiple of this (gpt2_cpu_gemm_k_multiple)
SWITCH_ENV = "GPT2_TRITON_CPU_GEMM"  # "0" turns the kernel off
CACHE_ENV = "GPT2_TRITON_CACHE_DIR"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gpt2-triton")


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX") or "c++")


def library_path(cxx: str) -> Path:
    """Where the library built from this source with these flags and this compiler lives."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + cxx.encode()).hexdigest()[:16]
    return cache_dir() / f"cpu_gemm-{digest}.so"


def build(cxx: str, target: Path) -> None:
    """Compile into a temporary file beside ``target`` and move it there: two processes building at once each
    end with a whole library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {result.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cpu_can_run() -> bool:
    """x86-64 with AVX2 (PyTorch reports AVX2 only with FMA; every AVX2 CPU has F16C)."""
    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    return is_x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built, loaded library, or None where it can't run (a failed build warns once, with the reason)."""
    if os.environ.get(SWITCH_ENV) == "0" or not _cpu_can_run():
        return None
    cxx = compiler()
    if cxx is None:
        return None
    target = library_path(cxx)
    try:
        if not target.exists():
            build(cxx, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"the CPU GEMM kernel is not used ({e}); CPU linears run PyTorch's GEMMs", stacklevel=2)
        return None
    lib.gpt2_cpu_gemm.restype = ctypes.c_int
    lib.gpt2_cpu_gemm.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
    if lib.gpt2_cpu_gemm_k_multiple() != K_MULTIPLE:
        raise RuntimeError(f"{target} disagrees with engine/cpu_gemm.py on K's multiple")
    return lib


def available() -> bool:
    return library() is not None


def supports(weight: torch.Tensor) -> bool:
    """Whether :func:`matmul` takes this weight: a 2-D CPU tensor of a dtype it reads, K a multiple of 16, and the
    library available."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in KINDS
        and weight.dim() == 2
        and weight.shape[1] % K_MULTIPLE == 0
        and available()
    )


def matmul(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T`` (times ``scales[n]`` per weight row, for int8 codes) as fp32 ``[M, N]``, for ``x [M, K]`` of
    any float dtype; ``weight`` must pass :func:`supports` and be contiguous, ``scales`` fp32 ``[N]``."""
    n, k = weight.shape
    x = x.float().contiguous()
    if x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu":
        raise ValueError(f"x of shape {tuple(x.shape)} on {x.device} does not match a CPU weight of shape {(n, k)}")
    if (weight.dtype == torch.int8) != (scales is not None):
        raise ValueError("scales go with int8 weights, and only with them")
    if scales is not None and (scales.dtype != torch.float32 or scales.shape != (n,) or not scales.is_contiguous()):
        raise ValueError(f"scales must be a contiguous fp32 tensor of shape ({n},)")
    if not weight.is_contiguous():
        raise ValueError("the weight must be contiguous")
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, n)
    elif out.shape != (m, n) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 tensor of shape {(m, n)}")
    status = library().gpt2_cpu_gemm(
        KINDS[weight.dtype],
        x.data_ptr(),
        weight.data_ptr(),
        None if scales is None else scales.data_ptr(),
        out.data_ptr(),
        m,
        n,
        k,
        torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError(f"the CPU GEMM refused a weight of shape {(n, k)} and dtype {weight.dtype}")
    return out
