"""The paged KV-cache store: ours vs torch's ``index_copy_`` into the flattened caches, and ``torch.compile`` of it.

    python bench/kernels/store_kv.py                  # CUDA: 1..16384 tokens of GPT-2 Medium (16 heads x 64)
    python bench/kernels/store_kv.py --dry-run        # CPU: tiny sizes under the Triton interpreter

K and V are strided views of a fused QKV, written to shuffled slots; the check is exact (caches poisoned first).
GB/s of K and V read and written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.harness import Bench, Case, Setup, main  # noqa: E402
from bench.shapes import model_for  # noqa: E402

TOKENS, DRY_TOKENS = (1, 16, 64, 256, 1024, 4096, 16384), (1, 5)


def torch_store_kv(k, v, k_cache, v_cache, slots) -> None:
    """The peer: ``index_copy_`` into the flattened caches (every slot valid here; no host sync, graph-safe)."""
    idx = slots.long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, idx, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, idx, v)


def case(bench: Bench, dtype: torch.dtype, tokens: int) -> Case:
    from kernels.kv_cache import store_kv

    model = model_for(bench.dry_run)
    h, hd, bs = model.heads, model.head_dim, model.block_size

    def setup() -> Setup:
        num_blocks = -(-2 * tokens // bs) + 1
        k_cache, v_cache = (bench.randn(num_blocks, bs, h, hd, dtype=dtype) for _ in range(2))
        qkv = bench.randn(tokens, 3, h, hd, dtype=dtype)
        k, v = qkv[:, 1], qkv[:, 2]
        slots = bench.randperm(num_blocks * bs)[:tokens].to(torch.int32)
        compiled = bench.compile(torch_store_kv)
        calls = {
            "triton": lambda: store_kv(k, v, k_cache, v_cache, slots),
            "torch": lambda: torch_store_kv(k, v, k_cache, v_cache, slots),
            "torch.compile": lambda: compiled(k, v, k_cache, v_cache, slots),
        }

        def output(p: str):
            def run():
                k_cache.fill_(float("nan"))
                v_cache.fill_(float("nan"))
                calls[p]()
                return k_cache.view(-1, h, hd)[slots.long()], v_cache.view(-1, h, hd)[slots.long()]

            return run

        return Setup(calls, (k.float(), v.float()), outputs={p: output(p) for p in calls})

    elt = torch.finfo(dtype).bits // 8
    return Case("store_kv", f"store_kv T={tokens}", dtype, setup, nbytes=4 * tokens * h * hd * elt, sweep="tokens",
                x=tokens, variant=f"H={h} hd={hd}", tol=0.0, params=dict(tokens=tokens))  # fmt: skip


def cases(bench: Bench, dtype: torch.dtype, args) -> list[Case]:
    return [case(bench, dtype, t) for t in args.tokens or (DRY_TOKENS if bench.dry_run else TOKENS)]


def add_arguments(ap) -> None:
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="tokens stored per call")


if __name__ == "__main__":
    sys.exit(main("store_kv", __doc__, cases, add_arguments=add_arguments))
