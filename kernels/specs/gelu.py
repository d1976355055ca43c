"""Compile specs of :mod:`kernels.gelu`."""

from __future__ import annotations

from kernels.gelu import BLOCK_SIZE, _gelu_kernel
from kernels.specs import KernelSpec


def compile_specs() -> list[KernelSpec]:
    """AOT compile specs: the one config, per dtype."""
    return [
        KernelSpec(
            name=f"gelu[{t}] BLOCK_SIZE={BLOCK_SIZE}",
            fn=_gelu_kernel,
            signature={"X": f"*{t}", "Y": f"*{t}", "n_elements": "i32"},
            constexprs={"BLOCK_SIZE": BLOCK_SIZE},
            num_warps=4,
            num_stages=1,
        )
        for t in ("fp32", "fp16", "bf16")
    ]
