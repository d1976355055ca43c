"""Compile specs of :mod:`kernels.lora` (batched LoRA's shrink)."""

from __future__ import annotations

from kernels.lora import BLOCK_K, LARGE_M, RANK_BLOCKS, SMALL_M, _lora_shrink_kernel
from kernels.specs import TL_TYPES, KernelSpec
from kernels.utils import FLOAT_DTYPES


def compile_specs() -> list[KernelSpec]:
    """Every tile :func:`kernels.lora.shrink_config` picks (decode-sized and larger batches, each rank block), per
    dtype; compiled, never the interpreter's fp32-upcast variant."""
    specs = []
    for dtype in FLOAT_DTYPES:
        t = TL_TYPES[dtype]
        signature = {
            "X": f"*{t}", "A": f"*{t}", "SLOTS": "*i64", "U": f"*{t}", "M": "i32",
            "K": "i32:16", "R": "i32", "stride_xm": "i32:16", "stride_um": "i32", "n_rank_blocks": "i32",
        }  # fmt: skip
        for block_m in (SMALL_M, LARGE_M):
            for block_r in RANK_BLOCKS:
                specs.append(
                    KernelSpec(
                        name=f"lora_shrink[{t}] BLOCK_M={block_m} BLOCK_R={block_r} BLOCK_K={BLOCK_K}",
                        fn=_lora_shrink_kernel,
                        signature=signature,
                        constexprs={"BLOCK_M": block_m, "BLOCK_R": block_r, "BLOCK_K": BLOCK_K, "UPCAST": False},
                        num_warps=4,
                        num_stages=1,
                    )
                )
    return specs
