"""Compile specs of :mod:`kernels.linear` (float weights), and the split-K epilogue kernel they share."""

from __future__ import annotations

import triton

from kernels.gemm import SPLIT_K_BUCKETS
from kernels.linear import FLOAT_FORMAT, keep
from kernels.specs import KernelSpec
from kernels.specs.gemm import (
    PLAIN,
    SHIPPED_BUCKETS,
    Epilogue,
    GemmVariant,
    WeightArgs,
    gemm_spec,
    splitk_epilogue_specs,
)

DTYPES = (("fp16", 2), ("bf16", 2), ("fp32", 4))  # activation type and bytes per element


def variants(t: str, nbytes: int, config: triton.Config, first_or_last: bool) -> list[GemmVariant]:
    """What one tile compiles for activation type ``t``: the fullest epilogue ``keep`` offers it (bias + gelu +
    residual, or bias + gelu for the largest tile), the bare one (LM head: no bias) on the first and the largest
    tile, and the split-K partial launch where small M may use the tile; fp32 runs only the first two kinds."""
    offered = [res for res in (True, False) if any(keep(config, mb, nbytes, nbytes, res) for mb in SHIPPED_BUCKETS)]
    if not offered:
        return []
    found = [GemmVariant(t, Epilogue(bias=True, gelu=True, residual=offered[0]))]
    if t != "fp32" and first_or_last:
        found.append(GemmVariant(t, PLAIN))
    if t != "fp32" and any(keep(config, mb, nbytes, nbytes) for mb in SPLIT_K_BUCKETS):
        found.append(GemmVariant(t, PLAIN, partial=True))
    return found


def compile_specs() -> list[KernelSpec]:
    """Every variant of every float tile, then the split-K epilogue kernel."""
    specs = []
    configs = FLOAT_FORMAT.configs()
    for t, nbytes in DTYPES:
        weight = WeightArgs(w=t, pointers={"S": f"*{t}"}, constexprs={"W_INT8": False})  # S: unused
        for i, c in enumerate(configs):
            for variant in variants(t, nbytes, c, first_or_last=i in (0, len(configs) - 1)):
                specs.append(gemm_spec("linear", FLOAT_FORMAT.kernel.fn, c, variant, weight))
    return specs + splitk_epilogue_specs()
