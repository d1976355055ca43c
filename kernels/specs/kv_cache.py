"""Compile specs of :mod:`kernels.kv_cache` (the paged cache store)."""

from __future__ import annotations

from kernels.kv_cache import SLOT_DTYPES, _store_kv_kernel
from kernels.specs import TL_TYPES, KernelSpec
from kernels.utils import FLOAT_DTYPES, row_block


def compile_specs() -> list[KernelSpec]:
    """Every (dtype, slot dtype, row block) the launcher can pick for GPT-2 widths (768 .. 1600 per token)."""
    specs = []
    for dtype in FLOAT_DTYPES:
        for slot_dtype in SLOT_DTYPES:
            for width in (768, 1600):  # BLOCK_SIZE 1024 and 2048
                block, num_warps = row_block(width)
                t, s = TL_TYPES[dtype], TL_TYPES[slot_dtype]
                signature = {
                    "K": f"*{t}", "V": f"*{t}", "K_cache": f"*{t}", "V_cache": f"*{t}", "slot_mapping": f"*{s}",
                    # multiples of 16 for every GPT-2 width, as the runtime specializes them
                    "stride_kt": "i32:16", "stride_kh": "i32:16", "stride_vt": "i32:16", "stride_vh": "i32:16",
                    "row_size": "i32:16",
                }  # fmt: skip
                specs.append(
                    KernelSpec(
                        name=f"store_kv[{t},{s}] BLOCK_SIZE={block}",
                        fn=_store_kv_kernel,
                        signature=signature,
                        constexprs={"HEAD_DIM": 64, "BLOCK_SIZE": block},
                        num_warps=num_warps,
                        num_stages=1,
                    )
                )
    return specs
