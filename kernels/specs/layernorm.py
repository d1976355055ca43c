"""Compile specs of :mod:`kernels.layernorm`."""

from __future__ import annotations

from kernels.layernorm import MAX_N, _layer_norm_fwd_kernel
from kernels.specs import KernelSpec
from kernels.utils import row_block


def compile_specs() -> list[KernelSpec]:
    """AOT compile specs: GPT-2 widths (768..1600 -> blocks 1024/2048) and the widest block, per dtype."""
    specs = []
    for n in (1024, 1600, MAX_N):  # blocks 1024 (gpt2 / medium), 2048 (large / xl), 8192 (the widest)
        block_n, num_warps = row_block(n, MAX_N)
        for t in ("fp32", "fp16", "bf16"):
            for has_res in (False, True):
                signature = {
                    "X": f"*{t}", "R": f"*{t}", "Y": f"*{t}", "H": f"*{t}", "W": f"*{t}", "B": f"*{t}",
                    "stride_x": "i32:16", "stride_r": "i32:16", "stride_y": "i32:16", "stride_h": "i32:16",
                    "N": "i32", "eps": "fp32",
                }  # fmt: skip
                specs.append(
                    KernelSpec(
                        name=f"layer_norm[{t}{',residual' if has_res else ''}] BLOCK_N={block_n}",
                        fn=_layer_norm_fwd_kernel,
                        signature=signature,
                        constexprs={"HAS_RESIDUAL": has_res, "BLOCK_N": block_n},
                        num_warps=num_warps,
                        num_stages=1,
                    )
                )
    return specs
