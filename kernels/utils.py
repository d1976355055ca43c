"""Shared helpers for the Triton kernels: interpreter detection, autotuning, row-wise block picking and
input validation.

Nothing here runs at import time beyond reading ``TRITON_INTERPRET``, which Triton itself reads when a
``@triton.jit`` function is decorated, so the two always agree.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import triton
import triton.language as tl


def is_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def upcast_in_interpreter(dtype: torch.dtype) -> bool:
    """A kernel's ``UPCAST``: multiply in fp32 where the interpreter's bf16 ``tl.dot`` (and int8 -> bf16 cast) is
    wrong (triton #11584); compiled code never upcasts."""
    return is_interpreter() and dtype == torch.bfloat16


# Read once, when the kernel modules are imported: the same moment Triton decides how to run @triton.jit.
INTERPRET = tl.constexpr(is_interpreter())


@triton.jit
def cast(x, dtype: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even for bf16 everywhere.

    Triton's interpreter truncates fp32 -> bf16 (compiled code rounds), which doubles bf16 rounding error on
    CPU; there we round the fp32 bits to the nearest bf16 value first, so the truncating cast is exact.
    """
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# ``GPT2_TRITON_AUTOTUNE=first``: run every autotuned kernel with its first config, as the interpreter does.
# For correctness runs on a GPU (``bench/gpu_check.py`` sets it for its test run): tuning every config of every
# new shape would spend minutes compiling and timing configs the tests don't need.
AUTOTUNE_ENV = "GPT2_TRITON_AUTOTUNE"


@triton.jit
def magic_base(dtype: tl.constexpr):
    """The ``2^m`` that :func:`magic_uint_to_float` adds: 2^10 for fp16, 2^7 for bf16, 2^23 for fp32."""
    if dtype == tl.float16:
        base = 1024.0
    elif dtype == tl.bfloat16:
        base = 128.0
    else:
        base = 8388608.0
    return base


@triton.jit
def magic_uint_to_float(u, dtype: tl.constexpr):
    """``2^m + u`` in ``dtype`` for small unsigned ints ``u``, exactly, by bit operations alone.

    Int-to-float conversion instructions run at a fraction of the ALU rate, enough to bound the weight
    bandwidth of a dequantizing GEMM. OR-ing ``u`` into the low mantissa bits of ``2^m``, where representable
    values are 1 apart, gives ``2^m + u`` (FasterTransformer's and Marlin's trick), for ``u`` below 1024 in fp16
    (2^10), 128 in bf16 (2^7) and 2^23 in fp32. Callers subtract :func:`magic_base`, folded into a zero point.
    """
    if dtype == tl.float16:
        f = (u.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    elif dtype == tl.bfloat16:
        f = (u.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
    else:
        f = (u.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True)
    return f


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """``triton.autotune`` that keeps only the first config under the interpreter (or ``AUTOTUNE_ENV=first``).

    Benchmarking every config in the interpreter would take minutes and measure nothing; the first
    config of each list is therefore the small one, chosen to keep interpreted tests fast.
    """
    if is_interpreter() or os.environ.get(AUTOTUNE_ENV, "").lower() == "first":
        configs = configs[:1]
    return triton.autotune(configs=configs, key=key, **kwargs)


class RestoreAliasedOutput:
    """Autotuner hooks for a GEMM whose output ``Y`` may be its residual input ``R`` (``out=residual``).

    Tuning runs the kernel once per config and repeat, so an in-place residual add would accumulate; the
    pre-hook saves ``Y`` and the post-hook puts it back, but only when ``Y`` really is ``R`` and this launch
    writes ``Y`` (not split-K partials). ``restore_value=["Y"]`` would clone ``Y`` around every timed run of
    every launch, adding two copies to each timing (for a decode GEMV, more than the GEMV itself).
    """

    def __init__(self) -> None:
        self.saved: torch.Tensor | None = None

    def pre_hook(self, nargs: dict, reset_only: bool = False) -> None:
        if reset_only:  # called once more after tuning, before the real launch: nothing to reset
            return
        y, r = nargs["Y"], nargs["R"]
        aliased = nargs["HAS_RESIDUAL"] and not nargs["PARTIAL"] and y.data_ptr() == r.data_ptr()
        self.saved = y.clone() if aliased else None

    def post_hook(self, nargs: dict, exception: BaseException | None) -> None:
        if self.saved is not None:
            nargs["Y"].copy_(self.saved)
            self.saved = None

    def kwargs(self) -> dict:
        """The hooks as ``triton.autotune`` keyword arguments."""
        return {"pre_hook": self.pre_hook, "post_hook": self.post_hook}


def row_block(n_cols: int, max_block: int = 65536) -> tuple[int, int]:
    """Pick ``(BLOCK_SIZE, num_warps)`` for a kernel that holds one row of ``n_cols`` in registers."""
    block = triton.next_power_of_2(n_cols)
    if block > max_block:
        raise ValueError(f"rows of {n_cols} elements exceed the largest supported block of {max_block}")
    num_warps = min(max(block // 256, 1), 16)
    return block, num_warps


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    ndim: int | None = None,
    device: torch.device | None = None,
    contiguous: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` when ``t`` is not a tensor of the expected kind."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {tuple(dtypes)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, stride {t.stride()})")


def check_device(*named: tuple[str, torch.Tensor]) -> torch.device:
    """All tensors on one device, and that device usable by Triton (CUDA, or CPU under the interpreter)."""
    devices = {t.device for _, t in named}
    if len(devices) != 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in named)
        raise ValueError(f"tensors must share one device: {where}")
    device = devices.pop()
    if device.type == "cpu" and not is_interpreter():
        raise ValueError("Triton kernels need CUDA tensors; CPU tensors run only with TRITON_INTERPRET=1")
    return device
