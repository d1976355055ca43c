"""Fused causal attention for prefill over a ragged batch (FlashAttention-2 style).

Sequences are packed along the token axis; sequence ``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b+1]``. One
program computes ``BLOCK_M`` query rows of one (sequence, head): it streams the keys/values in ``BLOCK_N``
tiles, keeping a running row max ``m``, row sum ``l`` and output accumulator in fp32 (online softmax, in base 2
with ``log2(e)`` folded into the scale). Causality lets it stop at the diagonal: the tiles strictly left of
the query block need no mask at all, only the tiles on the diagonal do. Q, K and V are read through their
strides, so they can be views of the fused QKV projection ``[T, 3 * H * hd]`` without a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention_common import LOG2E, MAX_GRID_Y, check_head_dim, online_softmax_step
from kernels.kv_cache import check_kv_cache
from kernels.utils import FLOAT_DTYPES, autotune, cast, check_device, check_tensor, upcast_in_interpreter


def get_configs() -> list[triton.Config]:
    """Tile shapes to autotune over; the first (small) one is the only one the interpreter runs."""
    shapes = [
        # (BLOCK_M, BLOCK_N, num_warps, num_stages)
        (32, 16, 8, 1),
        (32, 32, 8, 2),
        (64, 16, 8, 2),
        (64, 32, 8, 2),
        (64, 32, 4, 3),
        (64, 64, 4, 3),
        (64, 64, 8, 3),
        (128, 32, 8, 3),
        (128, 64, 8, 3),
        (128, 64, 8, 4),
        (128, 128, 8, 3),  # the Triton tutorial's Hopper tile for hd <= 64
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def keep(config: triton.Config) -> bool:
    """The diagonal loop steps BLOCK_N through a BLOCK_M query block, so BLOCK_N must divide BLOCK_M."""
    return config.kwargs["BLOCK_M"] % config.kwargs["BLOCK_N"] == 0


def fits(config: triton.Config, head_dim: int, fp32: bool) -> bool:
    """Whether a tile compiles without register spills on sm_80 and sm_90 (rules read off the compile gate).

    fp32 runs both dots on FMA units with whole operands in registers: 8 warps and small tiles only. For
    fp16/bf16 the Q tile and accumulator (BLOCK_M x HEAD_DIM) stay within 128 x 64, and the score tile too,
    or within 128 x 128 on 8 warps.
    """
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    if fp32:
        return config.num_warps == 8 and m * n <= 2048 and (m + n) * head_dim <= 6144
    return m * head_dim <= 128 * 64 and (m * n <= 128 * 64 or (m * n <= 128 * 128 and config.num_warps == 8))


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune only over the tiles that fit this head dim and dtype (the first config always does)."""
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    fp32 = named_args["Q"].dtype == torch.float32
    return [c for c in configs if fits(c, head_dim, fp32)] or configs[:1]


@autotune(
    configs=[c for c in get_configs() if keep(c)],
    key=["seqlen_bucket", "HEAD_DIM"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _prefill_attention_kernel(
    Q,  # pointer to queries, shape (T, H, HEAD_DIM), last dim contiguous
    K,  # pointer to keys, shape (T, H, HEAD_DIM), last dim contiguous
    V,  # pointer to values, shape (T, H, HEAD_DIM), last dim contiguous
    Out,  # pointer to the output, shape (T, H, HEAD_DIM), last dim contiguous
    cu_seqlens,  # pointer to sequence boundaries, shape (B + 1,), int32: sequence b is rows [cu[b], cu[b+1])
    K_cache,  # pointer to the paged key cache, contiguous (num_blocks, block_size, H, HEAD_DIM) (if STORE_KV)
    V_cache,  # pointer to the paged value cache, same layout (if STORE_KV)
    slot_mapping,  # pointer to each token's cache slot, shape (T,), int32/int64; -1: not cached (if STORE_KV)
    stride_qt,  # elements between consecutive tokens of Q
    stride_qh,  # elements between consecutive heads of Q
    stride_kt,  # elements between consecutive tokens of K
    stride_kh,  # elements between consecutive heads of K
    stride_vt,  # elements between consecutive tokens of V
    stride_vh,  # elements between consecutive heads of V
    stride_ot,  # elements between consecutive tokens of Out
    stride_oh,  # elements between consecutive heads of Out
    H,  # number of heads
    qk_scale,  # softmax scale times log2(e): scores are computed in base 2
    seqlen_bucket,  # next power of two of max_seqlen: the autotune key, unused in the body
    HEAD_DIM: tl.constexpr,  # head dimension hd, a power of two in 16..128
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key/value rows per inner step; divides BLOCK_M
    UPCAST: tl.constexpr,  # interpreter only: run tl.dot in fp32 (its bf16 dot is broken, triton #11584)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), else "tf32" (ignored for fp16/bf16)
    STORE_KV: tl.constexpr,  # also write the K/V rows of this query block into the paged cache
):
    # The longest query blocks do the most work: hand them out first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    seq_start = tl.load(cu_seqlens + b)
    seq_len = tl.load(cu_seqlens + b + 1) - seq_start
    start_m = pid_m * BLOCK_M
    if start_m >= seq_len:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # Scalar base pointers of this (sequence, head); the per-element offsets below stay 32-bit.
    row0 = seq_start.to(tl.int64)
    Qb = Q + row0 * stride_qt + h * stride_qh
    Kb = K + row0 * stride_kt + h * stride_kh
    Vb = V + row0 * stride_vt + h * stride_vh
    Ob = Out + row0 * stride_ot + h * stride_oh

    q = tl.load(Qb + offs_m[:, None] * stride_qt + offs_d[None, :], mask=offs_m[:, None] < seq_len, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Off-diagonal tiles: every key precedes every query of the block (and lies inside the sequence): no mask.
    for start_n in range(0, start_m, BLOCK_N):
        cols = start_n + offs_n
        # K is read transposed, (HEAD_DIM, BLOCK_N), so QK^T is a plain tl.dot.
        kt = tl.load(Kb + cols[None, :] * stride_kt + offs_d[:, None])
        v = tl.load(Vb + cols[:, None] * stride_vt + offs_d[None, :])
        m_i, l_i, acc = online_softmax_step(
            q, kt, v, m_i, l_i, acc, qk_scale, True, MASKED=False, UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION
        )

    # Diagonal tiles: causal mask, and keys past the end of the sequence are masked out. Their keys are this
    # block's own rows: each K/V row of a sequence passes through exactly one program's diagonal (per head),
    # which is where STORE_KV writes it to the paged cache, with no extra read.
    end_n = tl.minimum(start_m + BLOCK_M, seq_len)
    for start_n in range(start_m, end_n, BLOCK_N):
        cols = start_n + offs_n
        kt = tl.load(Kb + cols[None, :] * stride_kt + offs_d[:, None], mask=cols[None, :] < seq_len, other=0.0)
        v = tl.load(Vb + cols[:, None] * stride_vt + offs_d[None, :], mask=cols[:, None] < seq_len, other=0.0)
        if STORE_KV:
            slot = tl.load(slot_mapping + row0 + cols, mask=cols < seq_len, other=-1).to(tl.int64)
            cache_row = slot * (H * HEAD_DIM) + h * HEAD_DIM  # the cache's (slot, h) row
            tl.store(K_cache + cache_row[None, :] + offs_d[:, None], kt, mask=slot[None, :] >= 0)
            tl.store(V_cache + cache_row[:, None] + offs_d[None, :], v, mask=slot[:, None] >= 0)
        # Row m always keeps key start_m <= m, so no row is fully masked and the running max stays finite.
        visible = (offs_m[:, None] >= cols[None, :]) & (cols[None, :] < seq_len)
        m_i, l_i, acc = online_softmax_step(
            q, kt, v, m_i, l_i, acc, qk_scale, visible, MASKED=True, UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION
        )

    acc = acc / l_i[:, None]
    out_ptrs = Ob + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(out_ptrs, cast(acc, Out.dtype.element_ty), mask=offs_m[:, None] < seq_len)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    out: torch.Tensor | None = None,
    kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention within each sequence of a ragged batch: ``q, k, v [T, H, hd]`` -> ``[T, H, hd]``.

    ``cu_seqlens [B+1]`` (int32) bounds the sequences; ``max_seqlen`` must be at least the longest of them
    (not checked on the device, which would cost a sync). ``out`` (contiguous ``[T, H, hd]``) is optional.
    ``kv_cache = (k_cache, v_cache, slot_mapping)``: also store every token's K/V in the paged cache, as
    :func:`kernels.kv_cache.store_kv` would (``[num_blocks, block_size, H, hd]`` each, slot ``-1``: skip), in the
    same pass.
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("k", k, dtypes=(q.dtype,), ndim=3)
    check_tensor("v", v, dtypes=(q.dtype,), ndim=3)
    check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndim=1)
    named = [("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)]
    if out is not None:
        check_tensor("out", out, dtypes=(q.dtype,), ndim=3, contiguous=True)
        named.append(("out", out))
    if kv_cache is not None:
        named += check_kv_cache(k, *kv_cache)
    check_device(*named)
    T, H, hd = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must have one shape")
    check_head_dim(hd)
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError(f"q, k, v need a contiguous last dim (strides {q.stride()}, {k.stride()}, {v.stride()})")
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens must hold at least one boundary (shape [B+1])")
    if not isinstance(max_seqlen, int) or max_seqlen < 0 or max_seqlen > max(T, 0):
        raise ValueError(f"max_seqlen={max_seqlen!r} must be an int in [0, T={T}]")
    if out is None:
        out = torch.empty((T, H, hd), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(q.shape)}")
    B = cu_seqlens.shape[0] - 1
    if B == 0 or T == 0 or max_seqlen == 0:
        return out
    # Grid axis 1 holds (sequence, head) and CUDA caps it at 65535: many short sequences (4096 one-token texts
    # of GPT-2 Medium's 16 heads) launch in chunks of sequences, each reading its slice of cu_seqlens.
    k_cache, v_cache, slots = kv_cache if kv_cache is not None else (out, out, cu_seqlens)  # unused if no cache
    seqs_per_launch = max(MAX_GRID_Y // H, 1)
    for first in range(0, B, seqs_per_launch):
        n_seqs = min(seqs_per_launch, B - first)
        grid = lambda meta, n_seqs=n_seqs: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), n_seqs * H)
        _prefill_attention_kernel[grid](
            q, k, v, out, cu_seqlens[first : first + n_seqs + 1], k_cache, v_cache, slots,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            H, scale * LOG2E, triton.next_power_of_2(max_seqlen),
            HEAD_DIM=hd,
            UPCAST=upcast_in_interpreter(q.dtype),
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            STORE_KV=kv_cache is not None,
        )  # fmt: skip
    return out


def prefill_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Reference in float64: per sequence and head, ``softmax(Q K^T * scale + causal mask) V``."""
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].double().transpose(0, 1) for t in (q, k, v))  # (H, L, hd)
        scores = qs @ ks.transpose(1, 2) * scale  # (H, L, L)
        causal = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out[start:end] = (torch.softmax(scores, dim=-1) @ vs).transpose(0, 1)
    return out
