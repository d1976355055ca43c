"""Attention of a step's query chunks over the paged KV cache: chunked prefill and prefix-cache hits.

Each sequence ``b`` of a ragged batch brings a chunk of ``L_b`` query rows (rows ``cu_seqlens_q[b]:
cu_seqlens_q[b+1]`` of ``q``), and all of its keys/values, this step's included, already sit in the paged cache
``[num_blocks, block_size, H, hd]`` behind its block table. Query row ``i`` of the chunk is token
``p = seq_lens[b] - L_b + i`` of the sequence and attends causally to cache positions ``0..p``.

One program computes ``BLOCK_M`` query rows of one (sequence, head), FlashAttention-2 style as in
:mod:`kernels.attention`: an online softmax in base 2 with fp32 statistics and accumulator, over ``BLOCK_N``
keys per step. Each step reads the cache block ids of its ``BLOCK_N`` tokens from the block table and gathers
their K/V rows. The keys strictly before the query block's first position need no mask; the few steps from
there to the block's last position (the diagonal) apply the causal mask, and their loads stop at the
sequence's length so stale cache slots are never read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention_common import LOG2E, MAX_GRID_Y, check_head_dim, online_softmax_step
from kernels.utils import FLOAT_DTYPES, autotune, cast, check_device, check_tensor, upcast_in_interpreter


def get_configs() -> list[triton.Config]:
    """Tile shapes to autotune over; the first (small) one is the only one the interpreter runs."""
    shapes = [
        # (BLOCK_M, BLOCK_N, num_warps, num_stages)
        (16, 16, 4, 1),
        (16, 32, 4, 2),  # short query tiles: decode-like chunks (small max_seqlen_q) compute no padding rows
        (16, 64, 4, 2),
        (32, 32, 4, 2),
        (32, 32, 8, 2),
        (32, 64, 4, 2),
        (32, 64, 8, 2),
        (64, 32, 4, 2),
        (64, 32, 8, 1),  # fp32's 64-row tile: with 2 stages it spills on sm_80
        (64, 32, 8, 2),
        (64, 64, 4, 3),
        (64, 64, 8, 3),
        (128, 32, 8, 3),
        (128, 64, 8, 3),
        # No 128 x 128 (attention.py's Hopper tile): the gathered K/V addresses take it to 248 registers on sm_80
        # at hd=64, and it spills at hd=16 (triton 3.6) and hd=128 (3.9).
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# fp32 runs both dots on FMA units with whole operands in registers: only these tiles compile without spills on
# sm_80 and sm_90 under triton 3.6 and 3.9 at hd=64 (at hd=128 only the first does).
FP32_SHAPES = {
    (16, 16, 4, 1),
    (16, 32, 4, 2),
    (16, 64, 4, 2),
    (32, 32, 4, 2),
    (32, 32, 8, 2),
    (32, 64, 8, 2),
    (64, 32, 8, 1),
}


def fits(config: triton.Config, head_dim: int, fp32: bool) -> bool:
    """Whether a tile compiles without register spills on sm_80 and sm_90 (rules read off the compile gate).

    fp16/bf16: the Q and K/V tiles, (BLOCK_M + BLOCK_N) x HEAD_DIM, stay within 3072 elements per warp (64 x 64
    on 4 warps spills at hd=128). fp32: the shapes of ``FP32_SHAPES``, and at hd=128 only the smallest.
    """
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    if fp32:
        shape = (m, n, config.num_warps, config.num_stages)
        return shape in FP32_SHAPES and (head_dim <= 64 or m * n <= 16 * 16)
    return (m + n) * head_dim <= 3072 * config.num_warps


def keep(config: triton.Config, seqlen_bucket: int) -> bool:
    """Query tiles taller than the longest chunk (rounded up to a power of two) compute only padding rows."""
    return config.kwargs["BLOCK_M"] <= max(seqlen_bucket, 16)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune only over the tiles that fit this head dim and dtype and the chunk lengths (the first always does)."""
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    bucket = kwargs.get("seqlen_bucket", named_args.get("seqlen_bucket"))
    fp32 = named_args["Q"].dtype == torch.float32
    return [c for c in configs if fits(c, head_dim, fp32) and keep(c, bucket)] or configs[:1]


@autotune(
    configs=get_configs(),
    key=["seqlen_bucket", "HEAD_DIM"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _context_attention_kernel(
    Q,  # pointer to the queries, shape (T, H, HEAD_DIM), last dim contiguous
    K_cache,  # pointer to the key cache, contiguous (num_blocks, BLOCK_SIZE, H, HEAD_DIM)
    V_cache,  # pointer to the value cache, contiguous (num_blocks, BLOCK_SIZE, H, HEAD_DIM)
    Out,  # pointer to the output, shape (T, H, HEAD_DIM), last dim contiguous
    cu_seqlens_q,  # pointer to the chunk boundaries, shape (B + 1,), int32: sequence b's rows are [cu[b], cu[b+1])
    seq_lens,  # pointer to the tokens of each sequence in the cache (this step's included), shape (B,), int32
    block_tables,  # pointer to each sequence's cache block ids, shape (B, max_blocks), int32, last dim contiguous
    stride_qt,  # elements between consecutive tokens of Q
    stride_qh,  # elements between consecutive heads of Q
    stride_ot,  # elements between consecutive tokens of Out
    stride_oh,  # elements between consecutive heads of Out
    stride_bt,  # elements between consecutive rows of block_tables
    H,  # number of heads
    max_seqlen_k,  # upper bound on seq_lens (tokens past it are never read)
    qk_scale,  # softmax scale times log2(e): scores are computed in base 2
    seqlen_bucket,  # next power of two of max_seqlen_q: the autotune key, unused in the body
    HEAD_DIM: tl.constexpr,  # head dimension hd, a power of two in 16..128
    BLOCK_SIZE: tl.constexpr,  # tokens per KV-cache block
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys/values per inner step
    UPCAST: tl.constexpr,  # interpreter only: run tl.dot in fp32 (its bf16 dot is broken, triton #11584)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), else "tf32" (ignored for fp16/bf16)
):
    # The longest query blocks do the most work: hand them out first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start = tl.load(cu_seqlens_q + b)
    q_len = tl.load(cu_seqlens_q + b + 1) - q_start
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    seq_len = tl.minimum(tl.load(seq_lens + b), max_seqlen_k)
    first_pos = seq_len - q_len + start_m  # cache position of this block's first query row

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    pos_m = seq_len - q_len + offs_m  # cache position of each query row
    row0 = q_start.to(tl.int64)
    Qb = Q + row0 * stride_qt + h * stride_qh
    Ob = Out + row0 * stride_ot + h * stride_oh
    table = block_tables + b.to(tl.int64) * stride_bt
    row_size = H * HEAD_DIM  # elements between consecutive slots of the cache
    Kh = K_cache + h * HEAD_DIM
    Vh = V_cache + h * HEAD_DIM

    # Rows past the chunk, written as pos_m < seq_len (offs_m < q_len): with the store's own spelling of the mask
    # the compiler keeps one predicate alive through both loops, and ptxas spills it (4 B, enough to fail the gate).
    q = tl.load(Qb + offs_m[:, None] * stride_qt + offs_d[None, :], mask=pos_m[:, None] < seq_len, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Keys before the step holding the first query position: every one precedes every query row of the block
    # and lies inside the sequence, so neither the table nor the cache loads need a mask.
    diag_start = tl.maximum(first_pos // BLOCK_N * BLOCK_N, 0)  # < 0 only if seq_lens breaks its contract
    for start_n in range(0, diag_start, BLOCK_N):
        tok = start_n + offs_n
        slot = tl.load(table + tok // BLOCK_SIZE).to(tl.int64) * BLOCK_SIZE + tok % BLOCK_SIZE
        k_rows = Kh + slot * row_size
        v_rows = Vh + slot * row_size
        # K is read transposed, (HEAD_DIM, BLOCK_N), so QK^T is a plain tl.dot.
        kt = tl.load(k_rows[None, :] + offs_d[:, None])
        v = tl.load(v_rows[:, None] + offs_d[None, :])
        m_i, l_i, acc = online_softmax_step(
            q, kt, v, m_i, l_i, acc, qk_scale, True, MASKED=False, UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION
        )

    # The diagonal: keys up to the block's last query position, causally masked. Tokens past the sequence's end
    # are not loaded at all (other=0), table entries included, so stale or NaN cache slots never enter. The
    # first step starts at or before every row's position, so no row is fully masked there and m_i turns finite.
    end_n = tl.minimum(first_pos + BLOCK_M, seq_len)
    for start_n in range(diag_start, end_n, BLOCK_N):
        tok = start_n + offs_n
        valid = tok < end_n
        block = tl.load(table + tok // BLOCK_SIZE, mask=valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + tok % BLOCK_SIZE
        k_rows = Kh + slot * row_size
        v_rows = Vh + slot * row_size
        kt = tl.load(k_rows[None, :] + offs_d[:, None], mask=valid[None, :], other=0.0)
        v = tl.load(v_rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        visible = tok[None, :] <= pos_m[:, None]
        m_i, l_i, acc = online_softmax_step(
            q, kt, v, m_i, l_i, acc, qk_scale, visible, MASKED=True, UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION
        )

    acc = acc / l_i[:, None]
    out_ptrs = Ob + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(out_ptrs, cast(acc, Out.dtype.element_ty), mask=offs_m[:, None] < q_len)


def context_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's query chunk over its paged cache: ``q [T, H, hd]`` -> ``[T, H, hd]``.

    ``cu_seqlens_q [B+1]``, ``seq_lens [B]`` and ``block_tables [B, max_blocks]`` are int32. Sequence ``b``'s
    queries are rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` (a chunk of ``L_b`` rows, possibly 0), and its first
    ``seq_lens[b] >= L_b`` tokens, this step's included, must already be in the cache; its query row ``i``
    attends to positions ``0..seq_lens[b] - L_b + i``. ``max_seqlen_q`` and ``max_seqlen_k`` bound the chunk
    lengths and ``seq_lens`` (not checked on the device, which would cost a sync; tokens past ``max_seqlen_k``
    are never read). ``q`` may be a strided view with a contiguous last dim; ``out`` (contiguous) is optional.
    Rows of ``out`` outside every chunk are left as they are. The kernel is autotuned on the first call with each
    (next power of two of ``max_seqlen_q``, head dim, dtype): make that call eagerly, not inside CUDA-graph capture.
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("k_cache", k_cache, dtypes=(q.dtype,), ndim=4, contiguous=True)
    check_tensor("v_cache", v_cache, dtypes=(q.dtype,), ndim=4, contiguous=True)
    check_tensor("cu_seqlens_q", cu_seqlens_q, dtypes=(torch.int32,), ndim=1)
    check_tensor("seq_lens", seq_lens, dtypes=(torch.int32,), ndim=1)
    check_tensor("block_tables", block_tables, dtypes=(torch.int32,), ndim=2)
    named = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("cu_seqlens_q", cu_seqlens_q)]
    named += [("seq_lens", seq_lens), ("block_tables", block_tables)]
    if out is not None:
        check_tensor("out", out, dtypes=(q.dtype,), ndim=3, contiguous=True)
        named.append(("out", out))
    check_device(*named)
    T, H, hd = q.shape
    check_head_dim(hd)
    if q.stride(2) != 1:
        raise ValueError(f"q needs a contiguous last dim (stride {q.stride()})")
    if k_cache.shape[2:] != (H, hd) or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} must both be "
            f"[num_blocks, block_size, {H}, {hd}]"
        )
    if cu_seqlens_q.shape[0] < 1:
        raise ValueError("cu_seqlens_q must hold at least one boundary (shape [B+1])")
    B = cu_seqlens_q.shape[0] - 1
    if seq_lens.shape[0] != B or block_tables.shape[0] != B:
        raise ValueError(
            f"seq_lens {tuple(seq_lens.shape)} and block_tables {tuple(block_tables.shape)} need B={B} rows "
            f"(cu_seqlens_q has {B + 1} boundaries)"
        )
    if block_tables.stride(1) != 1:
        raise ValueError(f"block_tables needs a contiguous last dim (stride {block_tables.stride()})")
    if not isinstance(max_seqlen_q, int) or not 0 <= max_seqlen_q <= T:
        raise ValueError(f"max_seqlen_q={max_seqlen_q!r} must be an int in [0, T={T}]")
    block_size = k_cache.shape[1]
    capacity = block_tables.shape[1] * block_size
    if not isinstance(max_seqlen_k, int) or not 0 <= max_seqlen_k <= capacity:
        raise ValueError(
            f"max_seqlen_k={max_seqlen_k!r} must be an int in [0, {block_tables.shape[1]} blocks x {block_size}]"
        )
    if out is None:
        out = torch.empty((T, H, hd), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(q.shape)}")
    if B == 0 or T == 0 or max_seqlen_q == 0:
        return out
    # Grid axis 1 holds (sequence, head) and CUDA caps it at 65535: launch in chunks of sequences.
    seqs_per_launch = max(MAX_GRID_Y // H, 1)
    for first in range(0, B, seqs_per_launch):
        n_seqs = min(seqs_per_launch, B - first)
        grid = lambda meta, n_seqs=n_seqs: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), n_seqs * H)
        _context_attention_kernel[grid](
            q, k_cache, v_cache, out, cu_seqlens_q[first : first + n_seqs + 1], seq_lens[first : first + n_seqs],
            block_tables[first : first + n_seqs],
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
            H, max_seqlen_k, scale * LOG2E, triton.next_power_of_2(max_seqlen_q),
            HEAD_DIM=hd,
            BLOCK_SIZE=block_size,
            UPCAST=upcast_in_interpreter(q.dtype),
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        )  # fmt: skip
    return out


def context_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Reference in float64: gather each sequence's tokens through its block table, then causal softmax(Q K^T) V
    with query row ``i`` of a chunk of ``L`` at position ``seq_len - L + i``. Rows outside every chunk are 0."""
    block_size = k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    bounds = cu_seqlens_q.tolist()
    for b, (start, end, n) in enumerate(zip(bounds[:-1], bounds[1:], seq_lens.tolist())):
        if end == start:
            continue
        pos = torch.arange(n, device=q.device)
        blocks = block_tables[b, pos // block_size].long()
        keys = k_cache[blocks, pos % block_size].double()  # (n, H, hd)
        values = v_cache[blocks, pos % block_size].double()
        scores = torch.einsum("lhd,nhd->hln", q[start:end].double(), keys) * scale  # (H, L, n)
        q_pos = torch.arange(n - (end - start), n, device=q.device)
        scores = scores.masked_fill(pos[None, :] > q_pos[:, None], float("-inf"))
        out[start:end] = torch.einsum("hln,nhd->lhd", torch.softmax(scores, dim=-1), values)
    return out
