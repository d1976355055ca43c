"""GELU with the tanh approximation (GPT-2's ``gelu_new``), elementwise, fp32 math.

``0.5 x (1 + tanh(u))`` with ``u = sqrt(2/pi) (x + 0.044715 x^3)`` equals ``x * sigmoid(2u)`` because
``tanh(u) = 2 sigmoid(2u) - 1``. That form needs only ``exp`` (Triton 3.6 and 3.9 share no ``tanh``) and avoids
the cancellation in ``1 + tanh(u)`` for negative x; the sigmoid is evaluated from ``exp(-|2u|)`` so it neither
overflows nor loses the tiny negative tail.
The jit helper :func:`gelu_tanh` is shared with the GEMM epilogue in :mod:`kernels.gemm`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.utils import FLOAT_DTYPES, cast, check_device, check_tensor

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
BLOCK_SIZE = 1024  # elements per program: 4 warps x 32 lanes x 8 elements


@triton.jit
def gelu_tanh(x):
    """GELU-tanh of an fp32 tensor: x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))."""
    z = 1.5957691216057308 * (x + 0.044715 * x * x * x)  # 2u = 2 sqrt(2/pi) (x + 0.044715 x^3)
    e = tl.exp(-tl.abs(z))  # in (0, 1]: never overflows
    sig = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))  # sigmoid(z), accurate in both tails
    return x * sig


@triton.jit
def _gelu_kernel(
    X,  # pointer to the input, n_elements contiguous values
    Y,  # pointer to the output, n_elements contiguous values (same dtype as X)
    n_elements,  # total number of elements
    BLOCK_SIZE: tl.constexpr,  # elements handled by one program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, cast(gelu_tanh(x), Y.dtype.element_ty), mask=mask)


def gelu(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise GELU-tanh of ``x`` (any shape, fp32/fp16/bf16), computed in fp32, returned in ``x.dtype``."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if out is not None:
        check_tensor("out", out, dtypes=(x.dtype,), contiguous=True)
        if out.shape != x.shape:
            raise ValueError(f"out shape {tuple(out.shape)} != x shape {tuple(x.shape)}")
        check_device(("x", x), ("out", out))
    else:
        check_device(("x", x))
    xc = x.contiguous()  # no copy for the (usual) contiguous activation
    y = out if out is not None else torch.empty_like(xc)
    n = xc.numel()
    if n == 0:
        return y
    _gelu_kernel[(triton.cdiv(n, BLOCK_SIZE),)](xc, y, n, BLOCK_SIZE=BLOCK_SIZE, num_warps=4)
    return y


def gelu_ref(x: torch.Tensor) -> torch.Tensor:
    """Torch reference in float64: 0.5 x (1 + tanh(u)) written as x * sigmoid(2u), which stays accurate in the
    negative tail where 1 + tanh(u) cancels (even in float64 below x ~ -5.5); cast back to x.dtype."""
    xd = x.double()
    u = SQRT_2_OVER_PI * (xd + 0.044715 * xd.pow(3))
    return (xd * torch.sigmoid(2.0 * u)).to(x.dtype)
