"""Decode attention over the paged KV cache (flash-decoding).

Each sequence has one new query and ``context_len`` cached tokens scattered over the blocks of its block table
(cache layout ``[num_blocks, block_size, H, hd]``). The context is cut into partitions of ``partition_size``
tokens; program ``(b, h, p)`` runs an online softmax over partition ``p`` (``BLOCK_N`` tokens per step, each
key/value row loaded once, 128-byte rows for hd=64 fp16) and writes its partial (max, sum, accumulator) in
fp32 to a workspace; a second kernel merges the partials of each (b, h). When the whole context fits in one
partition the first kernel normalizes and writes the output itself, and the merge is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.attention_common import LOG2E, check_head_dim
from kernels.utils import FLOAT_DTYPES, cast, check_device, check_tensor, is_interpreter

BLOCK_P = 16  # partials merged per step by the reduction kernel
TARGET_PROGRAMS = 1024  # enough (b, h, partition) programs to keep every SM of a large GPU streaming


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the partition kernel: tokens per step, warps, software-pipeline stages."""

    block_n: int
    num_warps: int
    num_stages: int


# Not autotuned: in serving the kernel runs inside CUDA graphs captured on padding rows (context 0), and the
# context grows every step, so there is no representative input to tune on. The first config keeps the
# interpreter's loops short-stepped (more online-softmax steps per test). The default, 128 tokens x 64 dims of K
# and V per step on 4 warps, double-buffered, beat the usual flash-decoding shape (64 tokens, 4 warps) at every
# shape of the first H200 run's ``decode_cfg`` sweep (fp16, context 1024, B = 1 / 32 / 64: 7.0 / 44.5 / 81.6 us
# against 7.5 / 49.4 / 90.6 us); ``bench/gpu_check.py`` times all of them on the GPU.
CONFIGS = (
    DecodeConfig(16, 2, 1),
    DecodeConfig(32, 4, 2),
    DecodeConfig(64, 4, 2),
    DecodeConfig(64, 8, 2),
    DecodeConfig(128, 4, 2),
    DecodeConfig(128, 8, 2),
)
DEFAULT_CONFIG = CONFIGS[4]
# fp32 K/V tiles take twice the registers: on 4 warps fp32 keeps to 32 tokens per step (64 spill on sm_80 with
# triton 3.6, the compile gate found), and its default runs 64 tokens on 8 warps
FP32_CONFIGS = tuple(c for c in CONFIGS if c.block_n <= 32 or c.num_warps == 8)
FP32_DEFAULT_CONFIG = CONFIGS[3]


def configs_for(dtype: torch.dtype) -> tuple[DecodeConfig, ...]:
    """The launch configs shipped for cache/query ``dtype`` (each passes the compile gate)."""
    return FP32_CONFIGS if dtype == torch.float32 else CONFIGS


def default_config(dtype: torch.dtype) -> DecodeConfig:
    """The interpreter runs the small first config; compiled code the default for ``dtype``."""
    if is_interpreter():
        return CONFIGS[0]
    return FP32_DEFAULT_CONFIG if dtype == torch.float32 else DEFAULT_CONFIG


@triton.jit
def _decode_partition_kernel(
    Q,  # pointer to the queries, shape (B, H, HEAD_DIM), last dim contiguous
    K_cache,  # pointer to the key cache, contiguous (num_blocks, BLOCK_SIZE, H, HEAD_DIM)
    V_cache,  # pointer to the value cache, contiguous (num_blocks, BLOCK_SIZE, H, HEAD_DIM)
    block_tables,  # pointer to each sequence's cache block ids, shape (B, max_blocks), int32, last dim contiguous
    context_lens,  # pointer to the number of cached tokens per sequence, shape (B,), int32
    Out,  # pointer to the output, shape (B, H, HEAD_DIM) (written only when SINGLE)
    part_max,  # pointer to the partial row max (base 2), shape (B, H, num_partitions), fp32 (unless SINGLE)
    part_sum,  # pointer to the partial softmax denominators, shape (B, H, num_partitions), fp32 (unless SINGLE)
    part_acc,  # pointer to the partial unnormalized outputs, shape (B, H, num_partitions, HEAD_DIM), fp32
    stride_qb,  # elements between consecutive sequences of Q
    stride_qh,  # elements between consecutive heads of Q
    stride_bt,  # elements between consecutive rows of block_tables
    stride_ob,  # elements between consecutive sequences of Out
    stride_oh,  # elements between consecutive heads of Out
    H,  # number of heads
    num_partitions,  # partitions per (b, h) in the workspace: cdiv(max_context_len, partition_size)
    partition_size,  # tokens per partition
    max_context_len,  # upper bound on context_lens (tokens beyond it are never read)
    qk_scale,  # softmax scale times log2(e): scores are computed in base 2
    HEAD_DIM: tl.constexpr,  # head dimension hd, a power of two
    BLOCK_SIZE: tl.constexpr,  # tokens per KV-cache block
    SINGLE: tl.constexpr,  # one partition covers every context: normalize and write Out directly
    BLOCK_N: tl.constexpr,  # tokens processed per step
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2)
    ctx = tl.minimum(tl.load(context_lens + b), max_context_len)
    if SINGLE:
        part_start = 0
        part_end = ctx
    else:
        part_start = p * partition_size
        if part_start >= ctx:
            return  # past this sequence's end: the reduction never reads this partial
        part_end = tl.minimum(part_start + partition_size, ctx)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_d).to(tl.float32) * qk_scale
    table = block_tables + b.to(tl.int64) * stride_bt
    row_size = H * HEAD_DIM  # elements between consecutive slots of the cache
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start_n in range(part_start, part_end, BLOCK_N):
        tok = start_n + offs_n
        valid = tok < part_end
        block = tl.load(table + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = block * BLOCK_SIZE + tok % BLOCK_SIZE
        kv_offs = slot[:, None] * row_size + h * HEAD_DIM + offs_d[None, :]  # (BLOCK_N, HEAD_DIM)
        k = tl.load(K_cache + kv_offs, mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(V_cache + kv_offs, mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], 1)
        s = tl.where(valid, s, float("-inf"))  # the first token of each step is valid: m_new stays finite
        m_new = tl.maximum(m_i, tl.max(s, 0))
        prob = tl.math.exp2(s - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(prob, 0)
        acc = acc * alpha + tl.sum(prob[:, None] * v, 0)
        m_i = m_new

    if SINGLE:
        out = acc / tl.where(l_i > 0, l_i, 1.0)  # context_len 0 (padding rows): acc = 0 gives zeros, not NaN
        tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, cast(out, Out.dtype.element_ty))
    else:
        idx = (b.to(tl.int64) * H + h) * num_partitions + p
        tl.store(part_max + idx, m_i)
        tl.store(part_sum + idx, l_i)
        tl.store(part_acc + idx * HEAD_DIM + offs_d, acc)


@triton.jit
def _decode_reduce_kernel(
    context_lens,  # pointer to the number of cached tokens per sequence, shape (B,), int32
    part_max,  # pointer to the partial row max (base 2), shape (B, H, num_partitions), fp32
    part_sum,  # pointer to the partial softmax denominators, shape (B, H, num_partitions), fp32
    part_acc,  # pointer to the partial unnormalized outputs, shape (B, H, num_partitions, HEAD_DIM), fp32
    Out,  # pointer to the output, shape (B, H, HEAD_DIM)
    stride_ob,  # elements between consecutive sequences of Out
    stride_oh,  # elements between consecutive heads of Out
    H,  # number of heads
    num_partitions,  # partitions per (b, h) in the workspace
    partition_size,  # tokens per partition
    max_context_len,  # upper bound on context_lens
    HEAD_DIM: tl.constexpr,  # head dimension hd
    BLOCK_P: tl.constexpr,  # partials merged per step
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.minimum(tl.load(context_lens + b), max_context_len)
    n_parts = tl.cdiv(ctx, partition_size)  # partitions the first kernel wrote for this sequence
    base = (b.to(tl.int64) * H + h) * num_partitions
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, HEAD_DIM)
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start_p in range(0, n_parts, BLOCK_P):
        parts = start_p + offs_p
        valid = parts < n_parts
        m_p = tl.load(part_max + base + parts, mask=valid, other=float("-inf"))
        l_p = tl.load(part_sum + base + parts, mask=valid, other=0.0)
        acc_p = tl.load(part_acc + (base + parts)[:, None] * HEAD_DIM + offs_d[None, :], mask=valid[:, None], other=0.0)
        m_new = tl.maximum(m_i, tl.max(m_p, 0))
        w = tl.math.exp2(m_p - m_new)  # 0 for the masked partials
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(w * l_p, 0)
        acc = acc * alpha + tl.sum(w[:, None] * acc_p, 0)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)  # no partial (context_len 0): zeros
    tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, cast(out, Out.dtype.element_ty))


def pick_partition_size(batch: int, heads: int, max_context_len: int) -> int:
    """Largest power-of-two partition (64..512 tokens) that still gives ~TARGET_PROGRAMS programs."""
    size = 512
    while size > 64 and batch * heads * triton.cdiv(max_context_len, size) < TARGET_PROGRAMS:
        size //= 2
    return size


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    partition_size: int | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """One query per sequence against its paged cache: ``q [B, H, hd]`` -> ``[B, H, hd]``.

    ``block_tables [B, max_blocks]`` and ``context_lens [B]`` are int32; ``context_lens`` must not exceed
    ``max_context_len`` (tokens past it are ignored), which must fit in the table. ``partition_size``
    (tokens per program) defaults to a pick from the batch shape; ``config`` (one of ``configs_for(q.dtype)``,
    for sweeps) to :func:`default_config`. A context of length 0 yields zeros.
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("k_cache", k_cache, dtypes=(q.dtype,), ndim=4, contiguous=True)
    check_tensor("v_cache", v_cache, dtypes=(q.dtype,), ndim=4, contiguous=True)
    check_tensor("block_tables", block_tables, dtypes=(torch.int32,), ndim=2)
    check_tensor("context_lens", context_lens, dtypes=(torch.int32,), ndim=1)
    named = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)]
    named += [("block_tables", block_tables), ("context_lens", context_lens)]
    if out is not None:
        check_tensor("out", out, dtypes=(q.dtype,), ndim=3, contiguous=True)
        named.append(("out", out))
    check_device(*named)
    B, H, hd = q.shape
    block_size = k_cache.shape[1]
    check_head_dim(hd)
    if q.stride(2) != 1:
        raise ValueError(f"q needs a contiguous last dim (stride {q.stride()})")
    if k_cache.shape[2:] != (H, hd) or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} must both be "
            f"[num_blocks, block_size, {H}, {hd}]"
        )
    if block_tables.shape[0] != B or context_lens.shape[0] != B:
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} need B={B} rows"
        )
    if block_tables.stride(1) != 1:
        raise ValueError(f"block_tables needs a contiguous last dim (stride {block_tables.stride()})")
    if not isinstance(max_context_len, int) or not 0 <= max_context_len <= block_tables.shape[1] * block_size:
        raise ValueError(
            f"max_context_len={max_context_len!r} must be an int in [0, {block_tables.shape[1]} blocks x {block_size}]"
        )
    if partition_size is None:
        partition_size = pick_partition_size(B, H, max_context_len)
    elif not isinstance(partition_size, int) or partition_size < 1:
        raise ValueError(f"partition_size={partition_size!r} must be a positive int")
    if config is None:
        config = default_config(q.dtype)
    elif config not in configs_for(q.dtype):
        raise ValueError(f"config={config!r} is not one of the configs shipped for {q.dtype}: {configs_for(q.dtype)}")
    if out is None:
        out = torch.empty((B, H, hd), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(q.shape)}")
    if B == 0:
        return out

    num_partitions = max(triton.cdiv(max_context_len, partition_size), 1)
    single = num_partitions == 1
    if single:
        part_max = part_sum = part_acc = torch.empty(1, dtype=torch.float32, device=q.device)  # unused
    else:
        part_max = torch.empty((B, H, num_partitions), dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty((B, H, num_partitions, hd), dtype=torch.float32, device=q.device)
    _decode_partition_kernel[(B, H, num_partitions)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_max, part_sum, part_acc,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        H, num_partitions, partition_size, max_context_len, scale * LOG2E,
        HEAD_DIM=hd, BLOCK_SIZE=block_size, SINGLE=single,
        BLOCK_N=config.block_n, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if not single:
        _decode_reduce_kernel[(B, H)](
            context_lens, part_max, part_sum, part_acc, out, out.stride(0), out.stride(1),
            H, num_partitions, partition_size, max_context_len,
            HEAD_DIM=hd, BLOCK_P=BLOCK_P, num_warps=4,
        )  # fmt: skip
    return out


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Reference in float64: gather each sequence's tokens through its block table, then softmax(q K^T) V."""
    B, H, hd = q.shape
    block_size = k_cache.shape[1]
    out = torch.zeros((B, H, hd), dtype=torch.float64, device=q.device)
    for b, n in enumerate(context_lens.tolist()):
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        blocks = block_tables[b, pos // block_size].long()
        keys = k_cache[blocks, pos % block_size].double()  # (n, H, hd)
        values = v_cache[blocks, pos % block_size].double()
        scores = torch.einsum("hd,nhd->hn", q[b].double(), keys) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), values)
    return out
