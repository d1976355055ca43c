"""Causal prefill attention on views of a fused QKV (and with the paged-cache store fused in): ours vs SDPA.

    python bench/kernels/prefill_attention.py             # CUDA: sequence length 64..4096 at 16384 tokens per batch
    python bench/kernels/prefill_attention.py --seq-len 1024 --tokens 8192
    python bench/kernels/prefill_attention.py --dry-run   # CPU: tiny sizes under the Triton interpreter

``torch`` is ``scaled_dot_product_attention(is_causal=True)`` on the same strided views (FlashAttention's kernel on a
GPU), plus ``index_copy_`` into the paged cache in the ``+store_kv`` variant (the engine's prefill writes K/V in the
same pass); ``torch.compile`` compiles that torch code. TFLOP/s of the causal half of QK^T and PV.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.harness import Bench, Case, Setup, main  # noqa: E402
from bench.kernels.store_kv import torch_store_kv  # noqa: E402
from bench.shapes import model_for  # noqa: E402

SEQ_LENS, TOKENS = (64, 128, 256, 512, 1024, 2048, 4096), 16384
DRY_SEQ_LENS, DRY_TOKENS = (16, 40), 80


def heads_first(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``(T, H, hd)`` -> ``(B, H, S, hd)`` view, no copy."""
    t, h, hd = x.shape
    return x.view(batch, t // batch, h, hd).transpose(1, 2)


def torch_prefill(q, k, v, batch, scale, k_cache, v_cache, slots):
    """The peer: SDPA over the sequences of the packed views (and the K/V store when a cache is given)."""
    if k_cache is not None:
        torch_store_kv(k, v, k_cache, v_cache, slots)
    return F.scaled_dot_product_attention(heads_first(q, batch), heads_first(k, batch), heads_first(v, batch),
                                          is_causal=True, scale=scale)  # fmt: skip


def case(bench: Bench, dtype: torch.dtype, batch: int, seq: int, store: bool) -> Case:
    from kernels.attention import prefill_attention, prefill_attention_ref

    model = model_for(bench.dry_run)
    h, hd, bs = model.heads, model.head_dim, model.block_size
    t, scale = batch * seq, model.head_dim**-0.5

    def setup() -> Setup:
        qkv = bench.randn(t, 3, h, hd, dtype=dtype)  # the fused QKV projection: q, k, v are strided views of it
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        cu = torch.arange(0, t + 1, seq, dtype=torch.int32, device=bench.device)
        num_blocks = -(-t // bs) + 1
        k_cache, v_cache = (bench.randn(num_blocks, bs, h, hd, dtype=dtype) for _ in range(2))
        slots = bench.randperm(num_blocks * bs)[:t]
        cache = (k_cache, v_cache, slots) if store else (None, None, None)
        compiled = bench.compile(torch_prefill)
        calls = {
            "triton": lambda: prefill_attention(q, k, v, cu, seq, scale, kv_cache=cache if store else None),
            "torch": lambda: torch_prefill(q, k, v, batch, scale, *cache),
            "torch.compile": lambda: compiled(q, k, v, batch, scale, *cache),
        }
        ref = heads_first(prefill_attention_ref(q, k, v, cu, scale), batch)  # float64

        def output(p: str):  # the attention (heads first), and what the store wrote (caches poisoned first)
            def run():
                k_cache.fill_(float("nan"))
                v_cache.fill_(float("nan"))
                out = calls[p]()
                out = heads_first(out, batch) if p == "triton" else out
                flat = lambda c: c.view(-1, h, hd)[slots]
                return (out, flat(k_cache), flat(v_cache)) if store else out

            return run

        return Setup(
            calls,
            (ref, k.float(), v.float()) if store else ref,
            outputs={p: output(p) for p in calls},
        )

    elt = torch.finfo(dtype).bits // 8
    return Case(
        "prefill_attention",
        f"prefill{'+store_kv' if store else ''} {batch}x{seq} H={h} hd={hd}",
        dtype,
        setup,
        flops=4.0 * batch * h * seq * seq * hd / 2,  # QK^T and PV, causal half
        nbytes=(4 + 2 * store) * t * h * hd * elt,  # q, k, v in, out written (+ k, v stored)
        sweep="seq_len",
        x=seq,
        variant="+store_kv" if store else "attention",
        params=dict(batch=batch, seq=seq, store_kv=store),
    )


def cases(bench: Bench, dtype: torch.dtype, args) -> list[Case]:
    tokens = args.tokens or (DRY_TOKENS if bench.dry_run else TOKENS)
    seqs = args.seq_len or (DRY_SEQ_LENS if bench.dry_run else SEQ_LENS)
    return [case(bench, dtype, max(tokens // s, 1), s, store) for store in (False, True) for s in seqs]


def add_arguments(ap) -> None:
    ap.add_argument("--seq-len", type=int, nargs="+", default=None, help="tokens per sequence")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per batch (batch = tokens // seq_len)")


if __name__ == "__main__":
    sys.exit(main("prefill_attention", __doc__, cases, add_arguments=add_arguments))
