"""LayerNorm forward, optionally fused with the residual add that precedes it in every GPT-2 block.

``h = x + residual`` is written once and normalised in the same pass, so the residual stream is read once
instead of twice. Statistics (mean, rstd) are computed in fp32 whatever the activation dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.utils import FLOAT_DTYPES, cast, check_device, check_tensor, row_block

MAX_N = 8192  # widest row handled in one program (GPT-2 xl is 1600; 4x of that still fits)


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # pointer to the input, shape (M, N), row stride stride_x, unit column stride
    R,  # pointer to the residual, shape (M, N), row stride stride_r (unused unless HAS_RESIDUAL)
    Y,  # pointer to the normalised output, shape (M, N), row stride stride_y
    H,  # pointer to h = x + residual, shape (M, N), row stride stride_h (unused unless HAS_RESIDUAL)
    W,  # pointer to the LayerNorm weight (gamma), shape (N,)
    B,  # pointer to the LayerNorm bias (beta), shape (N,)
    stride_x,  # elements between consecutive rows of X
    stride_r,  # elements between consecutive rows of R
    stride_y,  # elements between consecutive rows of Y
    stride_h,  # elements between consecutive rows of H
    N,  # row length (number of features)
    eps,  # variance epsilon, fp32
    HAS_RESIDUAL: tl.constexpr,  # add R to X (and store the sum to H) before normalising
    BLOCK_N: tl.constexpr,  # power of two >= N: the whole row lives in registers
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        # round the sum to the activation dtype first, so y is LN of exactly the h we return
        h = cast(x.to(tl.float32) + r.to(tl.float32), x.dtype)
        tl.store(H + row * stride_h + cols, h, mask=mask)
        x = h
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=0) / N
    diff = tl.where(mask, xf - mean, 0.0)
    var = tl.sum(diff * diff, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    y = diff * rstd * w + b
    tl.store(Y + row * stride_y + cols, cast(y, Y.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """View ``t [..., n]`` as ``[M, n]`` with unit column stride (copies only when no such view exists)."""
    t2 = t.reshape(-1, n)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    h_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` (or ``x`` itself, no copy); returns ``(LayerNorm(h), h)`` with y in ``x.dtype``.

    ``x, residual [..., N]`` (leading dims are flattened); ``weight, bias [N]`` of any float dtype.
    ``out`` / ``h_out`` optionally receive ``y`` / ``h`` (same shape and dtype as ``x``).
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if n > MAX_N:
        raise ValueError(f"x rows have {n} features; layer_norm supports at most {MAX_N}")
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=1, contiguous=True)
    check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, contiguous=True)
    if weight.shape[0] != n or bias.shape[0] != n:
        raise ValueError(f"weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must both be ({n},)")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    named = [("x", x), ("weight", weight), ("bias", bias)]
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,))
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        named.append(("residual", residual))
    for name, t in (("out", out), ("h_out", h_out)):
        if t is not None:
            check_tensor(name, t, dtypes=(x.dtype,), contiguous=True)
            if t.shape != x.shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} != x shape {tuple(x.shape)}")
            named.append((name, t))
    if h_out is not None and residual is None:
        raise ValueError("h_out is only written when residual is given (otherwise h is x itself)")
    check_device(*named)

    x2 = _rows(x, n)
    m = x2.shape[0]
    y = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, n)
    if residual is not None:
        r2 = _rows(residual, n)
        h = h_out if h_out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        h2 = h.view(-1, n)
    else:
        r2, h, h2 = x2, x, x2  # unused by the kernel; h is x itself
    if m == 0:
        return y, h
    block_n, num_warps = row_block(n, MAX_N)
    _layer_norm_fwd_kernel[(m,)](
        x2, r2, y2, h2, weight, bias,
        x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0),
        n, float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return y, h


def layer_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: ``h = x + residual`` in x.dtype, LayerNorm of h in fp32, y cast back to x.dtype."""
    h = x if residual is None else x + residual
    y = torch.nn.functional.layer_norm(h.float(), (h.shape[-1],), weight.float(), bias.float(), eps)
    return y.to(x.dtype), h
