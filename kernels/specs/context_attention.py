"""Compile specs of :mod:`kernels.context_attention` (query chunks over the paged cache)."""

from __future__ import annotations

import torch
import triton

from kernels.context_attention import _context_attention_kernel, fits, get_configs
from kernels.specs import TL_TYPES, KernelSpec
from kernels.utils import FLOAT_DTYPES


def _spec(config: triton.Config, dtype: torch.dtype, head_dim: int, block_size: int) -> KernelSpec:
    t = TL_TYPES[dtype]
    signature = {"Q": f"*{t}", "K_cache": f"*{t}", "V_cache": f"*{t}", "Out": f"*{t}"}
    signature |= {"cu_seqlens_q": "*i32", "seq_lens": "*i32", "block_tables": "*i32"}
    # q/out strides are multiples of 16 for every GPT-2 width; the table width and H need not be (gpt2-xl: 25).
    signature |= {"stride_qt": "i32:16", "stride_qh": "i32:16", "stride_ot": "i32:16", "stride_oh": "i32:16"}
    signature |= {"stride_bt": "i32", "H": "i32", "max_seqlen_k": "i32", "qk_scale": "fp32", "seqlen_bucket": "i32"}
    constexprs = dict(config.kwargs, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, UPCAST=False)
    constexprs["DOT_PRECISION"] = "ieee" if dtype == torch.float32 else "tf32"
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    return KernelSpec(
        name=f"context_attention[{t},hd={head_dim},bs={block_size}] BLOCK_M={bm} BLOCK_N={bn} "
        f"warps={config.num_warps} stages={config.num_stages}",
        fn=_context_attention_kernel.fn,
        signature=signature,
        constexprs=constexprs,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def compile_specs() -> list[KernelSpec]:
    """Every config autotuning may pick: all dtypes at GPT-2's head dim 64 with the engine's block size 16, fp16
    and fp32 at 128, the smallest and largest tile at head dims 16 and 32 and at block sizes 1 and 32."""
    configs = get_configs()
    specs = []
    for dtype in FLOAT_DTYPES:
        specs += [_spec(c, dtype, 64, 16) for c in configs if fits(c, 64, dtype == torch.float32)]
    for dtype in (torch.float16, torch.float32):
        specs += [_spec(c, dtype, 128, 16) for c in configs if fits(c, 128, dtype == torch.float32)]
    for head_dim, block_size in ((16, 16), (32, 16), (64, 1), (64, 32)):
        kept = [c for c in configs if fits(c, head_dim, False)]
        specs += [
            _spec(kept[0], torch.float16, head_dim, block_size),
            _spec(kept[-1], torch.float16, head_dim, block_size),
        ]
    return specs
