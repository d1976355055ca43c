"""Compile specs of :mod:`kernels.attention` (prefill)."""

from __future__ import annotations

import torch
import triton

from kernels.attention import _prefill_attention_kernel, fits, get_configs, keep
from kernels.specs import TL_TYPES, KernelSpec
from kernels.utils import FLOAT_DTYPES


def _spec(config: triton.Config, dtype: torch.dtype, head_dim: int, store_kv: bool = False) -> KernelSpec:
    t = TL_TYPES[dtype]
    signature = {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "Out": f"*{t}", "cu_seqlens": "*i32"}
    signature |= {"K_cache": f"*{t}", "V_cache": f"*{t}", "slot_mapping": "*i64" if store_kv else "*i32"}
    # Strides are multiples of 16 for every GPT-2 width (the runtime specializes them so); H is not (gpt2-xl: 25).
    signature |= {name: "i32:16" for name in ("stride_qt", "stride_qh", "stride_kt", "stride_kh")}
    signature |= {name: "i32:16" for name in ("stride_vt", "stride_vh", "stride_ot", "stride_oh")}
    signature |= {"H": "i32"}
    signature |= {"qk_scale": "fp32", "seqlen_bucket": "i32"}
    constexprs = dict(config.kwargs, HEAD_DIM=head_dim, UPCAST=False, STORE_KV=store_kv)
    constexprs["DOT_PRECISION"] = "ieee" if dtype == torch.float32 else "tf32"
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    return KernelSpec(
        name=f"prefill_attention[{t},hd={head_dim}{',store_kv' * store_kv}] BLOCK_M={bm} BLOCK_N={bn} "
        f"warps={config.num_warps} stages={config.num_stages}",
        fn=_prefill_attention_kernel.fn,
        signature=signature,
        constexprs=constexprs,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def compile_specs() -> list[KernelSpec]:
    """Every config autotuning may pick: all dtypes at GPT-2's head dim 64, with and without the cache store
    (the engine's prefill stores, scoring-only callers need not), fp16 and fp32 at 128, the smallest and
    largest tile at head dims 16 and 32."""
    configs = [c for c in get_configs() if keep(c)]
    specs = []
    for dtype in FLOAT_DTYPES:
        for store_kv in (False, True):
            specs += [_spec(c, dtype, 64, store_kv) for c in configs if fits(c, 64, dtype == torch.float32)]
    for dtype in (torch.float16, torch.float32):
        specs += [_spec(c, dtype, 128) for c in configs if fits(c, 128, dtype == torch.float32)]
    for head_dim in (16, 32):
        kept = [c for c in configs if fits(c, head_dim, False)]
        specs += [_spec(kept[0], torch.float16, head_dim), _spec(kept[-1], torch.float16, head_dim)]
    return specs
