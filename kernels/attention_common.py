"""What the attention kernels share: FlashAttention's online-softmax step, its base-2 constant, the head dims
they support and the grid limit their launchers chunk by.

:mod:`kernels.attention` (prefill) and :mod:`kernels.context_attention` (query chunks over the paged cache) run
the same FlashAttention-2 loop, :func:`online_softmax_step` once per ``BLOCK_N`` keys, with the ``MASKED`` stage
flag on the diagonal steps only (the Triton tutorial's ``_attn_fwd_inner`` with its ``STAGE``);
:mod:`kernels.paged_attention` (one query per sequence) keeps its vector form of the update.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x) = exp2(x * log2(e)), log2(e) folded into the scale
HEAD_DIMS = (16, 32, 64, 128)
MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2


def check_head_dim(head_dim: int) -> None:
    """Raise ``ValueError`` unless the kernels support ``head_dim``."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} is not supported; expected one of {HEAD_DIMS}")


@triton.jit
def online_softmax_step(q, kt, v, m_i, l_i, acc, qk_scale, visible, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):  # fmt: skip
    """One step of FlashAttention's online softmax (base 2): the scores of ``q (BLOCK_M, HEAD_DIM)`` against
    ``kt (HEAD_DIM, BLOCK_N)``, masked to ``visible`` when ``MASKED``, folded with ``v (BLOCK_N, HEAD_DIM)`` into the
    running row max ``m_i``, sum ``l_i`` and accumulator ``acc`` (fp32). Returns the updated three.

    ``UPCAST`` (interpreter only) multiplies in fp32, its bf16 ``tl.dot`` being broken (triton #11584);
    ``DOT_PRECISION`` is "ieee" for fp32 inputs (no TF32)."""
    if UPCAST:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc
