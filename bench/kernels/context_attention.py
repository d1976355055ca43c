"""Context attention (chunked prefill: a chunk of new queries over everything its sequence has in the paged cache):
ours vs SDPA and ``torch.compile``.

    python bench/kernels/context_attention.py             # CUDA: 8 sequences; cached context 0..4096 before a 512-token
                                                          # chunk, and chunks of 16..2048 after 1024 cached tokens
    python bench/kernels/context_attention.py --context 2048 --chunk 256
    python bench/kernels/context_attention.py --dry-run   # CPU: tiny sizes under the Triton interpreter

The engine runs this kernel when a prompt continues after cached blocks (prefix-cache hits, later chunks of a long
prompt). Providers as for paged decode: ``torch`` is SDPA with the offset causal mask over each sequence's K/V
gathered beforehand (outside the timing); ``torch-paged`` gathers through the block tables every call, then the same
SDPA; ``torch.compile`` compiles that paged torch code. TFLOP/s of the visible part of QK^T and PV.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.harness import Bench, Case, Setup, main  # noqa: E402
from bench.kernels.paged_decode import gathered, paged_cache  # noqa: E402
from bench.shapes import model_for  # noqa: E402

BATCH = 8
CONTEXTS, CHUNK_AT = (0, 256, 512, 1024, 2048, 4096), 512
CHUNKS, CONTEXT_AT = (16, 64, 256, 1024, 2048), 1024
DRY_BATCH, DRY_CONTEXTS, DRY_CHUNK_AT, DRY_CHUNKS, DRY_CONTEXT_AT = 2, (0, 23), 9, (1, 20), 16


def offset_causal(chunk: int, total: int, device) -> torch.Tensor:
    """``(chunk, total)``: query ``i`` sits at position ``total - chunk + i`` and sees positions up to it."""
    q_pos = torch.arange(total - chunk, total, device=device)
    return torch.arange(total, device=device)[None, :] <= q_pos[:, None]


def torch_context(q, keys, values, scale):
    """The peer: SDPA of each sequence's chunk ``q (B, H, L, hd)`` over its gathered ``keys (B, H, n, hd)``."""
    mask = offset_causal(q.shape[2], keys.shape[2], q.device)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


def torch_paged_context(q, k_cache, v_cache, tables, total, scale):
    """The same over the paged cache: gather ``total`` tokens per sequence through its block table, then SDPA."""
    bs = k_cache.shape[1]
    pos = torch.arange(total, device=q.device)
    slots = tables[:, pos // bs].long() * bs + pos % bs  # (B, n)
    keys = k_cache.flatten(0, 1)[slots].transpose(1, 2)  # (B, H, n, hd)
    values = v_cache.flatten(0, 1)[slots].transpose(1, 2)
    return torch_context(q, keys, values, scale)


def case(bench: Bench, dtype: torch.dtype, batch: int, ctx: int, chunk: int) -> Case:
    from kernels.context_attention import context_attention, context_attention_ref

    model = model_for(bench.dry_run)
    h, hd = model.heads, model.head_dim
    total, scale = ctx + chunk, hd**-0.5

    def setup() -> Setup:
        k_cache, v_cache, tables, lens = paged_cache(bench, dtype, batch, total)  # this step's K/V stored already
        q = bench.randn(batch * chunk, h, hd, dtype=dtype)
        qb = q.view(batch, chunk, h, hd).transpose(1, 2)  # (B, H, L, hd) view
        cu = torch.arange(0, batch * chunk + 1, chunk, dtype=torch.int32, device=bench.device)
        compiled = bench.compile(torch_paged_context)

        def calls(kc, vc, kk, vv) -> dict:
            return {
                "triton": lambda: context_attention(q, kc, vc, cu, lens, tables, chunk, total, scale),
                "torch": lambda: torch_context(qb, kk, vv, scale),
                "torch-paged": lambda: torch_paged_context(qb, kc, vc, tables, total, scale),
                "torch.compile": lambda: compiled(qb, kc, vc, tables, total, scale),
            }

        keys, values = gathered(k_cache, tables, total), gathered(v_cache, tables, total)
        c = calls(k_cache, v_cache, keys, values)
        heads_first = lambda out: out.view(batch, chunk, h, hd).transpose(1, 2)
        ref = heads_first(context_attention_ref(q, k_cache, v_cache, cu, lens, tables, scale))  # float64
        return Setup(
            c,
            ref,
            outputs={"triton": lambda: heads_first(c["triton"]())},
            copies=lambda: calls(*(t.clone() for t in (k_cache, v_cache, keys, values))),
            copy_bytes=2 * keys.nbytes,  # each provider reads one cache's worth per call
        )

    elt = torch.finfo(dtype).bits // 8
    visible = chunk * ctx + chunk * (chunk + 1) / 2  # (query, key) pairs each sequence computes
    return Case(
        "context_attention",
        f"context B={batch} ctx={ctx} chunk={chunk} H={h} hd={hd}",
        dtype,
        setup,
        flops=4.0 * batch * h * visible * hd,
        nbytes=(2 * batch * chunk + 2 * batch * total) * h * hd * elt,  # q in, out written; cached K and V read
        params=dict(batch=batch, ctx=ctx, chunk=chunk),
    )


def cases(bench: Bench, dtype: torch.dtype, args) -> list[Case]:
    dry = bench.dry_run
    batch = args.batch or (DRY_BATCH if dry else BATCH)
    out = []
    for ctx in args.context or (DRY_CONTEXTS if dry else CONTEXTS):
        chunk = DRY_CHUNK_AT if dry else CHUNK_AT
        out.append(case(bench, dtype, batch, ctx, chunk))
        out[-1].sweep, out[-1].x, out[-1].variant = "context", ctx, f"chunk {chunk}"
    for chunk in args.chunk or (DRY_CHUNKS if dry else CHUNKS):
        ctx = DRY_CONTEXT_AT if dry else CONTEXT_AT
        out.append(case(bench, dtype, batch, ctx, chunk))
        out[-1].sweep, out[-1].x, out[-1].variant = "chunk", chunk, f"context {ctx}"
    return out


def add_arguments(ap) -> None:
    ap.add_argument("--batch", type=int, default=None, help=f"sequences per call (default {BATCH})")
    ap.add_argument("--context", type=int, nargs="+", default=None, help="cached tokens before the chunk")
    ap.add_argument("--chunk", type=int, nargs="+", default=None, help="query tokens per sequence")


if __name__ == "__main__":
    sys.exit(main("context_attention", __doc__, cases, add_arguments=add_arguments))
