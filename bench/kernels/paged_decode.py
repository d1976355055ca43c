"""Paged decode attention (one query per sequence over its block table): ours vs SDPA and ``torch.compile``.

    python bench/kernels/paged_decode.py                   # CUDA: batch 1..256 at context 1024; context 128..4096, B=32
    python bench/kernels/paged_decode.py --batch 64 --context 1024 2048
    python bench/kernels/paged_decode.py --configs         # tuning: every shipped launch config vs the default
    python bench/kernels/paged_decode.py --dry-run         # CPU: tiny sizes under the Triton interpreter

Providers: ``torch`` is SDPA over a contiguous copy of each sequence's cache gathered beforehand (outside the timing:
the best SDPA can do); ``torch-paged`` is what the torch backend runs every step (gather through the block table,
then masked SDPA); ``torch.compile`` compiles that paged torch code, which inductor can fuse into one Triton kernel.
Memory-bound: GB/s of K and V read, against the measured copy bandwidth.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.harness import Bench, Case, Setup, main  # noqa: E402
from bench.shapes import model_for  # noqa: E402

BATCHES, CONTEXT_AT = (1, 4, 16, 32, 64, 128, 256), 1024
CONTEXTS, BATCH_AT = (128, 256, 512, 1024, 2048, 4096), 32
DRY_BATCHES, DRY_CONTEXT_AT, DRY_CONTEXTS, DRY_BATCH_AT = (1, 3), 40, (17, 40), 2


def paged_cache(bench: Bench, dtype: torch.dtype, batch: int, ctx: int):
    """K/V caches holding ``batch`` sequences of ``ctx`` tokens in shuffled blocks, their tables and lengths."""
    model = model_for(bench.dry_run)
    bs = model.block_size
    per_seq = -(-ctx // bs)
    num_blocks = batch * per_seq + 3  # a few spare blocks nobody reads
    k_cache, v_cache = (bench.randn(num_blocks, bs, model.heads, model.head_dim, dtype=dtype) for _ in range(2))
    tables = bench.randperm(num_blocks)[: batch * per_seq].view(batch, per_seq)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=bench.device)
    return k_cache, v_cache, tables.to(torch.int32).contiguous(), lens


def gathered(cache: torch.Tensor, tables: torch.Tensor, ctx: int) -> torch.Tensor:
    """A contiguous ``(B, H, ctx, hd)`` copy of each sequence's cached tokens."""
    return cache[tables.long()].flatten(1, 2)[:, :ctx].permute(0, 2, 1, 3).contiguous()


def torch_decode(q, keys, values, scale):
    """The peer: SDPA of one query per sequence over its pre-gathered keys and values."""
    return F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, scale=scale).squeeze(2)


def torch_paged_decode(q, k_cache, v_cache, tables, lens, ctx, scale):
    """The torch backend's decode attention: gather through the block table, then masked SDPA."""
    from engine.torch_ops import TorchOps

    return TorchOps().decode_attention(q, k_cache, v_cache, tables, lens, ctx, scale)


def case(bench: Bench, dtype: torch.dtype, batch: int, ctx: int, config=None) -> Case:
    """Our kernel against the peers; with ``config`` (a ``DecodeConfig``), that launch config (``triton-config``)
    against the shipped default (``triton``) instead."""
    from kernels.paged_attention import decode_attention, decode_attention_ref

    model = model_for(bench.dry_run)
    h, hd, bs = model.heads, model.head_dim, model.block_size
    scale = hd**-0.5

    def setup() -> Setup:
        k_cache, v_cache, tables, lens = paged_cache(bench, dtype, batch, ctx)
        q = bench.randn(batch, h, hd, dtype=dtype)
        keys, values = gathered(k_cache, tables, ctx), gathered(v_cache, tables, ctx)
        compiled = bench.compile(torch_paged_decode)

        def calls(kc, vc, kk, vv) -> dict:
            if config is not None:
                return {
                    "triton-config": lambda: decode_attention(q, kc, vc, tables, lens, ctx, scale, config=config),
                    "triton": lambda: decode_attention(q, kc, vc, tables, lens, ctx, scale),
                }
            return {
                "triton": lambda: decode_attention(q, kc, vc, tables, lens, ctx, scale),
                "torch": lambda: torch_decode(q, kk, vv, scale),
                "torch-paged": lambda: torch_paged_decode(q, kc, vc, tables, lens, ctx, scale),
                "torch.compile": lambda: compiled(q, kc, vc, tables, lens, ctx, scale),
            }

        def copies() -> dict:  # copies of the caches (and of the gathered ones): see harness.time_calls
            return calls(*(t.clone() for t in (k_cache, v_cache, keys, values)))

        ref = decode_attention_ref(q, k_cache, v_cache, tables, lens, scale)  # float64
        # each provider reads one cache's worth (K and V) per call: that is what the copies must exceed L2 by
        return Setup(calls(k_cache, v_cache, keys, values), ref, copies=copies, copy_bytes=2 * keys.nbytes)

    elt = torch.finfo(dtype).bits // 8
    name = f"decode B={batch} ctx={ctx} bs={bs}"
    params = dict(batch=batch, ctx=ctx)
    if config is not None:
        name = f"B={batch} N{config.block_n} w{config.num_warps} s{config.num_stages} vs default"
        params = dict(batch=batch, config=dataclasses.asdict(config))
    return Case(
        "paged_decode",
        name,
        dtype,
        setup,
        flops=0.0 if config is not None else 4.0 * batch * h * ctx * hd,
        nbytes=2 * batch * ctx * h * hd * elt,  # every cached K and V read once
        variant=f"bs={bs}",
        params=params,
    )


def config_cases(bench: Bench, dtype: torch.dtype, batches, ctx: int) -> list[Case]:
    """Every shipped launch config but the default, against the default (x > 1: a better default)."""
    from kernels.paged_attention import configs_for, default_config

    default = default_config(dtype)
    out = []
    for batch in batches:
        for i, cfg in enumerate(configs_for(dtype)):
            if cfg != default:
                out.append(case(bench, dtype, batch, ctx, cfg))
                out[-1].sweep, out[-1].x, out[-1].variant = "config", i, f"B={batch}"
    return out


def cases(bench: Bench, dtype: torch.dtype, args) -> list[Case]:
    dry = bench.dry_run
    batches = args.batch or (DRY_BATCHES if dry else BATCHES)
    contexts = args.context or (DRY_CONTEXTS if dry else CONTEXTS)
    if args.configs:
        return config_cases(bench, dtype, batches, DRY_CONTEXT_AT if dry else CONTEXT_AT)
    out = []
    for b in batches:
        out.append(case(bench, dtype, b, DRY_CONTEXT_AT if dry else CONTEXT_AT))
        out[-1].sweep, out[-1].x = "batch", b
    for c in contexts:
        out.append(case(bench, dtype, DRY_BATCH_AT if dry else BATCH_AT, c))
        out[-1].sweep, out[-1].x = "context", c
    return out


def add_arguments(ap) -> None:
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="sequences of the batch sweep")
    ap.add_argument("--context", type=int, nargs="+", default=None, help="cached tokens of the context sweep")
    ap.add_argument("--configs", action="store_true", help="the launch-config tuning sweep instead")


if __name__ == "__main__":
    sys.exit(main("paged_decode", __doc__, cases, add_arguments=add_arguments))
