"""oneDNN's bf16 GEMM, for the CPU GEMM's calls of :data:`MIN_ROWS` rows or more on a CPU with AMX.

Why: AMX multiplies bf16 tiles in hardware, and oneDNN (PyTorch's CPU GEMM library) uses it; our kernels widen
each bf16 weight to fp32 and run FMAs. On 2 Xeon cores with AMX (2026-12-01), gpt2-medium's ``c_fc`` (4096 x 1024)
with its GELU took 0.45 ms at M = 64 and 1.05 ms at M = 256 through oneDNN, against 2.3 and 9.7 ms for ours: a
prefill's GEMMs run about 10x faster, a batch of 64 decoding sequences' about 5x. Below about 6 rows the GEMM
reads weights more than it multiplies, and ours streams them faster (M = 1: 0.16 against 0.29 ms), so
:class:`engine.cpu_kernels.GemmWeight` keeps its own kernel there, on the same row-major weight: a bf16 weight
that oneDNN takes is not packed (packing gained nothing measurable on this CPU at M = 1).

oneDNN fuses the epilogue (bias, then GELU or the residual's add) in fp32 and rounds once, as our kernel does, but
sums in its own order: a row's bits depend on whether its batch reached :data:`MIN_ROWS`. ``GPT2_TRITON_CPU_ONEDNN=0``
keeps every call on our batch-invariant kernel; ``=1`` uses oneDNN wherever it runs bf16, AMX or not (unmeasured
without AMX).
"""

from __future__ import annotations

import functools
import os

import torch

ENV = "GPT2_TRITON_CPU_ONEDNN"  # "0": never; "1": wherever oneDNN runs bf16; unset: where it has AMX
MIN_ROWS = 6  # the smallest M sent to oneDNN: about where the two cross on gpt2-medium's shapes (2 Xeon cores)


@functools.cache
def runs_bf16() -> bool:
    """Whether PyTorch's oneDNN runs bf16 GEMMs with fused epilogues on this CPU (AVX-512 at least)."""
    try:
        return (
            torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):  # a torch without these private ops
        return False


def _has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


# Whether this CPU has AMX tiles (Sapphire Rapids and later Xeons), which oneDNN's bf16 GEMM runs on. A constant,
# read once at import, so that code torch.compile traces may branch on it.
HAS_AMX = _has_amx()


def chosen() -> bool:
    """Whether bf16 weights take oneDNN for large M: ``$GPT2_TRITON_CPU_ONEDNN`` where set, else where oneDNN has
    AMX. A value other than 0 or 1 is a ``ValueError`` naming it."""
    asked = os.environ.get(ENV)
    if asked not in (None, "0", "1"):
        raise ValueError(f"{ENV}={asked!r}: expected 0 or 1")
    if asked == "0":
        return False
    return runs_bf16() and (asked == "1" or HAS_AMX)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool, residual: torch.Tensor | None
) -> torch.Tensor:
    """``gelu(x @ weight.T + bias)`` or ``x @ weight.T + bias + residual`` (bias optional, not both GELU and the
    residual) in ``x``'s dtype from contiguous ``x [M, K]`` and ``weight [N, K]`` (bf16 row-major, as GemmWeight
    hands it, or fp32 in oneDNN's packed layout, as the torch backend's fallback does), the epilogue fused in fp32."""
    if residual is not None:
        if gelu:
            raise ValueError("oneDNN's fused epilogue takes GELU or a residual, not both")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    attr, algorithm = ("gelu", "tanh") if gelu else ("none", "")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)
