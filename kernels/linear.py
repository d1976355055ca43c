"""Linear layer ``act(x @ weight.T + bias) + residual`` as one Triton GEMM with a fused epilogue.

The weight keeps ``nn.Linear``'s ``[N, K]`` layout and is read through its strides, so a transposed or
column-major copy works without another copy. Accumulation is fp32; fp16/bf16 inputs use tensor cores and
fp32 inputs use exact IEEE products (the parity path). Programs are ordered in groups of ``GROUP_M`` row
blocks (the "swizzle" of Triton's matmul tutorial) so neighbouring programs share weight tiles in L2; small-M
GEMMs with few output tiles split K (decode). The GEMM body, its tile walk, epilogue, split-K and launcher are
:mod:`kernels.gemm`'s, shared with the quantized formats of :mod:`kernels.quant`; this module holds the float
weights' format (:data:`FLOAT_FORMAT`), its tiles and the torch reference.
"""

from __future__ import annotations

import torch
import triton

from kernels.gelu import gelu_ref
from kernels.gemm import SMEM_LIMIT, GemmOperands, WeightFormat, gemm_kernel
from kernels.gemm import choose_split_k as choose_split_k  # re-exported: bench/gpu_check.py imports it from here
from kernels.gemm import sm_count as sm_count  # re-exported: bench/gpu_check.py imports it from here
from kernels.utils import FLOAT_DTYPES, RestoreAliasedOutput, autotune, check_tensor, is_interpreter


def get_configs() -> list[triton.Config]:
    """GEMM tile configs. The first is the small one the interpreter runs; then decode, then prefill tiles."""

    def cfg(bm: int, bn: int, bk: int, warps: int, stages: int, group: int = 8) -> triton.Config:
        kw = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}
        return triton.Config(kw, num_warps=warps, num_stages=stages)

    return [
        cfg(16, 64, 64, 4, 3),  # interpreter / small decode
        # decode, M <= 64: thin row tiles, long K steps, narrow N tiles to spread the weight over many SMs
        cfg(16, 32, 128, 4, 4),
        cfg(16, 64, 128, 4, 4),
        cfg(16, 32, 256, 4, 3),
        cfg(32, 64, 128, 4, 4),
        cfg(64, 64, 64, 4, 4),
        # prefill
        cfg(64, 128, 64, 4, 4),
        cfg(128, 64, 64, 4, 4),
        cfg(128, 128, 64, 8, 3),
        cfg(128, 128, 64, 8, 4),
        # the Triton tutorial's Hopper tile; it spills with a residual epilogue (255 registers), so ``keep``
        # offers it only to layers without one (QKV, MLP up + GELU, LM head). 256 x 128 spills with GELU too.
        cfg(128, 256, 64, 8, 3),
    ]


def smem_bytes(config: triton.Config, a_bytes: int, b_bytes: int) -> int:
    """Shared memory the software pipeline needs: ``num_stages`` buffers of one A and one B tile."""
    kw = config.kwargs
    return config.num_stages * kw["BLOCK_K"] * (kw["BLOCK_M"] * a_bytes + kw["BLOCK_N"] * b_bytes)


def keep(config: triton.Config, m_bucket: int, a_bytes: int, b_bytes: int, residual: bool = True) -> bool:
    """Whether a config is worth benchmarking for this row bucket, operand widths and epilogue (fits smem, no
    spills); ``residual``: the epilogue adds a residual."""
    kw = config.kwargs
    if smem_bytes(config, a_bytes, b_bytes) > SMEM_LIMIT:
        return False
    if residual and kw["BLOCK_M"] * kw["BLOCK_N"] > 128 * 128:
        return False  # the residual tile's registers on top of the accumulator spill
    if a_bytes == 4 and ((kw["BLOCK_M"], kw["BLOCK_N"]) != (16, 64) or kw["BLOCK_K"] > 128):
        return False  # fp32 IEEE dots run on CUDA cores: larger tiles spill registers on sm_80
    if kw["BLOCK_M"] > max(16, m_bucket):
        return False  # mostly masked rows
    if m_bucket >= 512 and kw["BLOCK_M"] < 64:
        return False  # thin tiles re-read the weight M/BLOCK_M times
    return True


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    a_bytes = args["X"].element_size()
    kept = [c for c in configs if keep(c, args["M_KEY"], a_bytes, a_bytes, args["HAS_RESIDUAL"])]
    return kept or configs[:1]


_linear_kernel = autotune(
    configs=get_configs(),
    key=["M_KEY", "N", "K", "SPLIT_K"],
    prune_configs_by={"early_config_prune": _prune},
    **RestoreAliasedOutput().kwargs(),  # tuning an in-place residual add (out=residual) must not accumulate
)(gemm_kernel)


class FloatFormat(WeightFormat):
    """Float weights, ``[N, K]`` in x's dtype, read through their strides."""

    name = "float"

    def operands(self, weight: torch.Tensor) -> GemmOperands:
        # S (the int8 scales) is unused without W_INT8: the weight stands in for it
        return GemmOperands((weight, weight), weight.stride(), {"W_INT8": False})

    def check(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        if weight.dtype != x.dtype:
            raise ValueError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")

    def upcast(self, dtype: torch.dtype) -> bool:
        return is_interpreter()  # every dtype multiplies in fp32 under the interpreter


FLOAT_FORMAT = FloatFormat(_linear_kernel, get_configs)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """``act(x @ weight.T + bias) + residual`` for ``x [M, K]``, ``weight [N, K]``; output ``[M, N]`` in x.dtype.

    Any strides are read as they are (no copies); ``activation`` is None or "gelu_tanh". ``out`` may be
    ``residual`` itself (in-place residual add: each element is read before it is written, by the same thread),
    but must not overlap ``x``. ``split_k`` forces the number of K splits (tests); None picks it from the shape.
    """
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    return FLOAT_FORMAT.run(x, weight, bias, activation, residual, out, split_k=split_k)


def linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference in fp32 (or x's dtype if wider): act(x @ W.T + b) + residual, cast to x.dtype."""
    wide = torch.promote_types(x.dtype, torch.float32)
    y = x.to(wide) @ weight.to(wide).t()
    if bias is not None:
        y = y + bias.to(wide)
    if activation == "gelu_tanh":
        y = gelu_ref(y)
    if residual is not None:
        y = y + residual.to(wide)
    return y.to(x.dtype)
