"""Compile specs of the GEMM kernels (:mod:`kernels.gemm`): the variants every weight format compiles, their
signature, and the split-K epilogue kernel. :mod:`kernels.specs.linear` and :mod:`kernels.specs.quant` choose
which variants each tile ships."""

from __future__ import annotations

from dataclasses import dataclass, field

import triton

from kernels.gemm import REDUCE_BLOCK_M, REDUCE_BLOCK_N, REDUCE_WARPS, splitk_epilogue_kernel
from kernels.specs import KernelSpec

# Triton specializes integer arguments equal to 1 into constants at run time; contiguous operands therefore
# compile with these unit column strides, and the compile gate checks that (vectorized, pipelined) variant.
UNIT_STRIDES = {"stride_xk": 1, "stride_wk": 1, "stride_rn": 1, "stride_yn": 1}
# m_key buckets that stand for what a tile is offered to: decode, a small batch, a long prefill
SHIPPED_BUCKETS = (16, 64, 16384)


@dataclass(frozen=True)
class Epilogue:
    """What a GEMM tile adds before its store: bias, then GELU-tanh, then the residual."""

    bias: bool = False
    gelu: bool = False
    residual: bool = False

    @property
    def name(self) -> str:
        """ "bias,gelu,residual", "bias,gelu", ... or "plain" for a bare store."""
        parts = [part for part, on in (("bias", self.bias), ("gelu", self.gelu), ("residual", self.residual)) if on]
        return ",".join(parts) or "plain"

    def constexprs(self) -> dict[str, bool]:
        return {"HAS_BIAS": self.bias, "APPLY_GELU": self.gelu, "HAS_RESIDUAL": self.residual}


FULL = Epilogue(bias=True, gelu=True, residual=True)  # the fullest: every flag on
PLAIN = Epilogue()  # the LM head's (no bias), and the split-K partial launch's (no epilogue at all)


@dataclass(frozen=True)
class GemmVariant:
    """One compiled form of a GEMM tile: activation type, epilogue, and unsplit or split-K partial."""

    dtype: str  # Triton type of the activations: "fp16", "bf16", "fp32"
    epilogue: Epilogue = PLAIN
    partial: bool = False  # split-K: fp32 partials to P, SPLIT_K a runtime argument (unsplit: the constant 1)

    @property
    def name(self) -> str:
        return "split-k partial" if self.partial else self.epilogue.name

    def constexprs(self) -> dict[str, object]:
        split = {"PARTIAL": True} if self.partial else {"PARTIAL": False, "SPLIT_K": 1}
        return {**self.epilogue.constexprs(), "UPCAST": False, **split, **UNIT_STRIDES}


@dataclass(frozen=True)
class WeightArgs:
    """How one weight format fills a GEMM spec: its weight's element type and its own arguments."""

    w: str  # Triton type of W's elements: the activation type, "i8" or "u8"
    pointers: dict[str, str]  # the format's other pointers (scales, zero points) and their types
    signature: dict[str, str] = field(default_factory=dict)  # further runtime arguments, e.g. a scale stride
    constexprs: dict[str, object] = field(default_factory=dict)  # the format's switches, e.g. W_INT8, GROUP_SIZE
    tag: str = ""  # added to the spec name after the variant, e.g. ",g64"


def config_name(c: triton.Config) -> str:
    kw = c.kwargs
    return f"BLOCK_M={kw['BLOCK_M']} BLOCK_N={kw['BLOCK_N']} BLOCK_K={kw['BLOCK_K']} w{c.num_warps} s{c.num_stages}"


def gemm_signature(variant: GemmVariant, weight: WeightArgs) -> dict[str, str]:
    """Runtime arguments of a GEMM kernel, minus ``UNIT_STRIDES``.

    K and the row strides carry the ``:16`` divisibility hint the runtime gives them on GPT-2's shapes (all its
    widths are multiples of 16); without it the K-tail mask blocks vectorized, pipelined (cp.async) loads.
    """
    t = variant.dtype
    sig = {"X": f"*{t}", "W": f"*{weight.w}", **weight.pointers, "B": f"*{t}", "R": f"*{t}", "Y": f"*{t}"}
    sig["P"] = "*fp32" if variant.partial else f"*{t}"
    sig.update(M="i32", N="i32", K="i32:16", M_KEY="i32")
    if variant.partial:
        sig["SPLIT_K"] = "i32"
    for name in ("stride_xm", "stride_wn", "stride_rm", "stride_ym"):
        sig[name] = "i32:16"
    return {**sig, **weight.signature}


def gemm_spec(kernel: str, fn, config: triton.Config, variant: GemmVariant, weight: WeightArgs) -> KernelSpec:
    """The spec of GEMM kernel ``fn`` (named ``kernel`` in the gate's table) at one tile and variant."""
    signature = gemm_signature(variant, weight)
    return KernelSpec(
        name=f"{kernel}[{variant.dtype},{variant.name}{weight.tag}] {config_name(config)}",
        fn=fn,
        signature={name: signature[name] for name in fn.arg_names if name in signature},
        constexprs={**variant.constexprs(), **weight.constexprs, **config.kwargs},
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def splitk_epilogue_specs() -> list[KernelSpec]:
    """Specs of the split-K reduce + epilogue kernel: fp16/bf16, full and bare epilogue."""
    specs = []
    for t in ("fp16", "bf16"):
        for epilogue in (FULL, PLAIN):
            sig = {"P": "*fp32", "B": f"*{t}", "R": f"*{t}", "Y": f"*{t}", "M": "i32", "N": "i32", "SPLIT_K": "i32"}
            sig.update(stride_rm="i32:16", stride_ym="i32:16")
            tile = {"stride_rn": 1, "stride_yn": 1, "BLOCK_M": REDUCE_BLOCK_M, "BLOCK_N": REDUCE_BLOCK_N}
            specs.append(
                KernelSpec(
                    name=f"splitk_epilogue[{t},{epilogue.name}]",
                    fn=splitk_epilogue_kernel,
                    signature=sig,
                    constexprs={**epilogue.constexprs(), **tile},
                    num_warps=REDUCE_WARPS,
                )
            )
    return specs
