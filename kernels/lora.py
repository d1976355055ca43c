"""Batched LoRA's shrink: each row times the A matrix of its own adapter, many adapters in one launch (S-LoRA's and
Punica's SGMV shrink, in the layout of :mod:`engine.lora`).

``u[m, s*R : (s+1)*R] = x[m] @ a[s].T`` for the slot ``s = slots[m]`` of row ``m``, and zeros in every other column
of ``u [M, S * R]`` (all of them for a row of slot -1). The expand that follows, ``u @ b.T`` with ``b [N, S * R]``,
is one dense GEMM over all slots (:mod:`kernels.linear`, its epilogue adding the base GEMM's residual), since the
zeros select each row's adapter.

A program computes one ``BLOCK_M x BLOCK_R`` tile of ``u``: rows ``BLOCK_M`` of the batch against ranks ``BLOCK_R``
of one slot. The rows of other slots load as zeros, and a tile none of whose rows uses its slot skips the loop over
``K`` and writes zeros: a step costs about one pass over its rows per adapter in it, not per slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gemm import dot
from kernels.utils import FLOAT_DTYPES, cast, check_device, check_tensor, upcast_in_interpreter

BLOCK_K = 32  # the reduction step over K (every GPT-2 width is a multiple; at 64, fp32 tiles spill)
SMALL_M = 16  # BLOCK_M for decode-sized batches; larger ones take LARGE_M rows a program
LARGE_M = 64
RANK_BLOCKS = (16, 64)  # BLOCK_R: 16 for ranks up to 16 (tl.dot's smallest), else 64 (a slot's ranks in blocks)


@triton.jit
def _lora_shrink_kernel(
    X,  # pointer to the activations, shape (M, K), rows stride_xm apart, unit column stride
    A,  # pointer to the stacked LoRA A matrices, shape (S, R, K), contiguous
    SLOTS,  # pointer to each row's slot, shape (M,) int64; -1: no adapter
    U,  # pointer to the output, shape (M, S * R), contiguous
    M,  # rows
    K,  # the input width
    R,  # ranks per slot (the padded max_lora_rank)
    stride_xm,  # row stride of X, in elements
    stride_um,  # row stride of U: S * R
    n_rank_blocks,  # cdiv(R, BLOCK_R): program_id(1) = slot * n_rank_blocks + rank block
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: multiply in fp32 (bf16 tl.dot bug)
):
    pid_r = tl.program_id(1)
    slot, rank_block = pid_r // n_rank_blocks, pid_r % n_rank_blocks
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = rank_block * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows, in_ranks = rows < M, ranks < R
    mine = tl.load(SLOTS + rows, mask=in_rows, other=-1) == slot  # the rows of this tile that use the slot
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if tl.max(mine.to(tl.int32), axis=0) > 0:
        a_rows = A + (slot * R + ranks).to(tl.int64) * K  # rank r of the slot is row slot * R + r of A
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            in_k = ks < K
            x = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=mine[:, None] & in_k[None, :], other=0.0)
            a = tl.load(a_rows[None, :] + ks[:, None], mask=in_k[:, None] & in_ranks[None, :], other=0.0)
            acc = dot(x, a, acc, UPCAST)  # (BLOCK_M, BLOCK_K) @ (BLOCK_K, BLOCK_R)
    u = U + rows[:, None] * stride_um + (slot * R + ranks)[None, :]
    tl.store(u, cast(acc, U.dtype.element_ty), mask=in_rows[:, None] & in_ranks[None, :])


def shrink_config(M: int, R: int) -> dict[str, int]:
    """The tile for ``M`` rows and ``R`` ranks per slot: ``BLOCK_M``, ``BLOCK_R``, ``BLOCK_K``, ``num_warps``."""
    block_r = RANK_BLOCKS[0] if R <= RANK_BLOCKS[0] else RANK_BLOCKS[1]
    return dict(BLOCK_M=SMALL_M if M <= SMALL_M else LARGE_M, BLOCK_R=block_r, BLOCK_K=BLOCK_K, num_warps=4)


def lora_shrink(
    x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``u [M, S * R]``: row ``m`` holds ``x[m] @ lora_a[slots[m]].T`` in its slot's ``R`` columns and zeros elsewhere
    (everywhere for slot -1). ``x [M, K]`` (unit column stride), ``lora_a [S, R, K]`` contiguous in ``x``'s dtype,
    ``slots [M]`` int64; ``out``: where to write ``u`` (contiguous). fp32 accumulation, ``u`` in ``x``'s dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("lora_a", lora_a, dtypes=(x.dtype,), ndim=3, contiguous=True)
    check_tensor("slots", slots, dtypes=(torch.int64,), ndim=1, contiguous=True)
    check_device(("x", x), ("lora_a", lora_a), ("slots", slots))
    M, K = x.shape
    S, R, _ = lora_a.shape
    if lora_a.shape[2] != K:
        raise ValueError(f"lora_a {tuple(lora_a.shape)} does not match x {tuple(x.shape)}: its last dim must be {K}")
    if slots.shape[0] != M:
        raise ValueError(f"slots has {slots.shape[0]} entries for {M} rows of x")
    if M and x.stride(1) != 1:
        raise ValueError(f"x must have unit column stride, got stride {x.stride()}")
    if out is not None:
        check_tensor("out", out, dtypes=(x.dtype,), contiguous=True)
        check_device(("x", x), ("out", out))
        if out.shape != (M, S * R):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {(M, S * R)}")
    u = out if out is not None else torch.empty(M, S * R, dtype=x.dtype, device=x.device)
    if M == 0 or S * R == 0:
        return u
    config = shrink_config(M, R)
    n_rank_blocks = triton.cdiv(R, config["BLOCK_R"])
    grid = (triton.cdiv(M, config["BLOCK_M"]), S * n_rank_blocks)
    _lora_shrink_kernel[grid](
        x, lora_a, slots, u, M, K, R, x.stride(0), u.stride(0), n_rank_blocks, **config,
        UPCAST=upcast_in_interpreter(x.dtype),
    )  # fmt: skip
    return u


def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Torch reference in float64, row by row; cast back to ``x``'s dtype."""
    S, R, _ = lora_a.shape
    u = torch.zeros(x.shape[0], S * R, dtype=torch.float64, device=x.device)
    for m, s in enumerate(slots.tolist()):
        if s >= 0:
            u[m, s * R : (s + 1) * R] = lora_a[s].double() @ x[m].double()
    return u.to(x.dtype)
