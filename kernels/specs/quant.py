"""Compile specs of :mod:`kernels.quant`: the int8 and int4 GEMMs (the split-K epilogue kernel's specs are in
:mod:`kernels.specs.linear`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import triton

from kernels.gemm import SPLIT_K_BUCKETS, WeightFormat
from kernels.quant import INT4_FORMAT, INT8_FORMAT, keep_quant
from kernels.specs import KernelSpec
from kernels.specs.gemm import FULL, PLAIN, SHIPPED_BUCKETS, GemmVariant, WeightArgs, gemm_spec
from kernels.specs.linear import DTYPES


def int8_args(config: triton.Config) -> WeightArgs:
    return WeightArgs(w="i8", pointers={"S": "*fp32"}, constexprs={"W_INT8": True})


def int4_args(config: triton.Config) -> WeightArgs:
    """int4 at the group size each tile ships for: 128 for BLOCK_K=128 tiles, 64 for the others."""
    group = 128 if config.kwargs["BLOCK_K"] == 128 else 64
    return WeightArgs(
        w="u8",
        pointers={"S": "*fp32", "Z": "*u8"},
        signature={"stride_sn": "i32"},  # K // group_size: 1600 // 64 = 25 is not a multiple of 16
        constexprs={"GROUP_SIZE": group, "stride_sg": 1},
        tag=f",g{group}",
    )


@dataclass(frozen=True)
class QuantSpecs:
    """One quantized format's specs: its launcher object, bits per weight, and its arguments at a tile."""

    weight_format: WeightFormat
    bits: int
    weight_args: Callable[[triton.Config], WeightArgs]


FORMATS = (QuantSpecs(INT8_FORMAT, 8, int8_args), QuantSpecs(INT4_FORMAT, 4, int4_args))


def variants(t: str, nbytes: int, config: triton.Config, first: bool, bits: int, group: int) -> list[GemmVariant]:
    """What one tile compiles: the full epilogue, the bare one on the first tile, and the split-K partial launch
    where small M may use the tile (fp16/bf16 only, as fp32 never splits); nothing where no bucket keeps it."""
    if not any(keep_quant(config, mb, nbytes, bits, group) for mb in SHIPPED_BUCKETS):
        return []
    found = [GemmVariant(t, FULL)]
    if first and t != "fp32":
        found.append(GemmVariant(t, PLAIN))
    if t != "fp32" and any(keep_quant(config, mb, nbytes, bits, group) for mb in SPLIT_K_BUCKETS):
        found.append(GemmVariant(t, PLAIN, partial=True))
    return found


def compile_specs() -> list[KernelSpec]:
    """Every variant of every int8 and int4 tile, for each activation type."""
    specs = []
    for fmt in FORMATS:
        kernel = fmt.weight_format.kernel.fn
        for t, nbytes in DTYPES:
            for i, c in enumerate(fmt.weight_format.configs()):
                weight = fmt.weight_args(c)
                group = weight.constexprs.get("GROUP_SIZE", 0)
                for variant in variants(t, nbytes, c, i == 0, fmt.bits, group):
                    specs.append(gemm_spec(f"{fmt.weight_format.name}_linear", kernel, c, variant, weight))
    return specs
