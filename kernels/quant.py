"""Weight-only quantized linear layers: int8 per-output-channel and int4 group-wise, dequantized in registers.

Decode is bound by reading weights, so storing them in 8 or 4 bits cuts the bytes per token 2x or 4x. The
GEMM kernels load the quantized tiles, turn them into the activation dtype in registers and feed ``tl.dot``;
the epilogue (bias, GELU, residual) is :mod:`kernels.gemm`'s, as for float weights.

* int8: ``w[n, k] ~= q[n, k] * scale[n]``, ``q`` in [-127, 127] (symmetric). The scale is per output
  channel, so it factors out of the K sum and is applied once to the fp32 accumulator.
* int4: ``w[n, k] ~= (q[n, k] - zero[n, g]) * scale[n, g]`` with ``g = k // group_size`` and ``q`` in
  [0, 15] (asymmetric). Two values per byte along K: byte ``j`` of a row holds ``k = 2j`` in its low nibble
  and ``k = 2j + 1`` in its high nibble. The kernel never interleaves the nibbles: it multiplies the low
  nibbles by the even columns of x and the high nibbles by the odd ones (two half-depth dots). Codes turn into
  floats by bit operations (:func:`kernels.utils.magic_uint_to_float`), not int-to-float conversions, whose
  low throughput would otherwise cap a decode GEMV below memory bandwidth.
  ``group_size`` is 64 or 128 and must divide K; :func:`quantize_int4` picks 128 when it divides K and
  64 otherwise (GPT-2 xl's width 1600 is divisible by 64 but not 128).

Each format is one :class:`kernels.gemm.WeightFormat` (:data:`INT8_FORMAT`, :data:`INT4_FORMAT`): the launch,
the epilogue and split-K (fp32 partials per K range, then :func:`kernels.gemm.splitk_epilogue_kernel`) are
:mod:`kernels.gemm`'s; the int8 scale is applied to each split's partial sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.gemm import (
    SMEM_LIMIT,
    GemmOperands,
    WeightFormat,
    dot,
    gemm_kernel,
    tile_setup,
    write_tile,
)
from kernels.linear import linear_ref
from kernels.utils import (
    FLOAT_DTYPES,
    RestoreAliasedOutput,
    autotune,
    check_tensor,
    magic_base,
    magic_uint_to_float,
)

INT4_GROUP_SIZES = (64, 128)
SCALED_PARTIAL_TILE = tl.constexpr(
    32 * 64
)  # int4 tiles up to this many outputs scale per-step partial sums (see the kernel)
FP32_TILES = ((16, 32, 32), (16, 32, 64), (16, 64, 32))  # (BLOCK_M, BLOCK_N, BLOCK_K) for fp32 activations


@dataclass
class Int8Weight:
    """int8 weight ``qweight [N, K]`` with one fp32 scale per output channel ``scales [N]``."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self) -> None:
        check_tensor("qweight", self.qweight, dtypes=(torch.int8,), ndim=2)
        check_tensor("scales", self.scales, dtypes=FLOAT_DTYPES, ndim=1, contiguous=True)
        if self.scales.shape[0] != self.qweight.shape[0]:
            raise ValueError(f"scales {tuple(self.scales.shape)} must be ({self.qweight.shape[0]},)")
        if self.scales.device != self.qweight.device:
            raise ValueError(f"scales on {self.scales.device} but qweight on {self.qweight.device}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[N, K]`` this stands for: ``q * scale`` in fp32, cast to ``dtype``."""
        return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)

    def to(self, device: torch.device | str) -> Int8Weight:
        return Int8Weight(self.qweight.to(device), self.scales.to(device))


@dataclass
class Int4Weight:
    """int4 weight packed two per byte along K, ``qweight [N, K//2]`` uint8, with per-group
    ``scales [N, K//group_size]`` (float) and ``zeros [N, K//group_size]`` (uint8 zero points in [0, 15])."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    def __post_init__(self) -> None:
        check_tensor("qweight", self.qweight, dtypes=(torch.uint8,), ndim=2)
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")
        n, k = self.shape
        if k % self.group_size:
            raise ValueError(f"K={k} is not divisible by group_size={self.group_size}")
        check_tensor("scales", self.scales, dtypes=FLOAT_DTYPES, ndim=2)
        check_tensor("zeros", self.zeros, dtypes=(torch.uint8,), ndim=2)  # integers: the kernel subtracts exactly
        for name, t in (("scales", self.scales), ("zeros", self.zeros)):
            if tuple(t.shape) != (n, k // self.group_size):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({n}, {k // self.group_size})")
            if t.device != self.qweight.device:
                raise ValueError(f"{name} on {t.device} but qweight on {self.qweight.device}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qweight.shape[0], self.qweight.shape[1] * 2)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def unpack(self) -> torch.Tensor:
        """The 4-bit codes as ``int16 [N, K]`` in [0, 15]."""
        p = self.qweight.to(torch.int16)
        return torch.stack((p & 0xF, p >> 4), dim=-1).flatten(1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[N, K]`` this stands for: ``(q - zero) * scale`` per group in fp32, cast to ``dtype``."""
        g = self.group_size
        q = self.unpack().float()
        z = self.zeros.float().repeat_interleave(g, dim=1)
        s = self.scales.float().repeat_interleave(g, dim=1)
        return ((q - z) * s).to(dtype)

    def to(self, device: torch.device | str) -> Int4Weight:
        return Int4Weight(self.qweight.to(device), self.scales.to(device), self.zeros.to(device), self.group_size)


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8: ``scale[n] = max|w[n, :]| / 127``."""
    check_tensor("w", w, dtypes=FLOAT_DTYPES, ndim=2)
    wf = w.float()
    scales = wf.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(wf / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q.contiguous(), scales.contiguous())


def quantize_int4(w: torch.Tensor, group_size: int | None = None) -> Int4Weight:
    """Asymmetric group-wise int4 along K: per group, ``scale = (max - min) / 15`` and an integer zero point.

    ``group_size=None`` picks 128 when it divides K, else 64; an explicit size that does not divide K raises.
    """
    check_tensor("w", w, dtypes=FLOAT_DTYPES, ndim=2)
    n, k = w.shape
    if group_size is None:
        group_size = next((g for g in (128, 64) if k % g == 0), None)
        if group_size is None:
            raise ValueError(f"K={k} is divisible by neither 128 nor 64: int4 groups cannot tile it")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"K={k} is not divisible by group_size={group_size} (try group_size=64 or None)")
    wg = w.float().reshape(n, k // group_size, group_size)
    lo = wg.amin(dim=-1).clamp(max=0.0)  # include 0 so it is exactly representable
    hi = wg.amax(dim=-1).clamp(min=0.0)
    scales = ((hi - lo) / 15.0).clamp(min=1e-12)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.round(wg / scales[..., None] + zeros[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return Int4Weight(packed.contiguous(), scales.contiguous(), zeros.to(torch.uint8).contiguous(), group_size)


# ---------------------------------------------------------------------------------------------------------
# configs


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, group: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}, num_warps=warps, num_stages=stages
    )


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). The first is the small one the interpreter runs;
# BLOCK_K 64 divides both int4 group sizes.
_GEMV_TILES = [(16, 64, 64, 4, 3), (16, 32, 128, 4, 4), (16, 64, 128, 4, 4)]
_PREFILL_TILES = [
    (32, 64, 128, 4, 4),
    (64, 128, 64, 8, 4),
    (128, 64, 64, 8, 4),
    (128, 128, 32, 8, 4),  # BLOCK_K=64 at this tile spills on sm_80 (dequantized tiles cost registers)
    # fp32 activations (parity / CPU path): CUDA-core dots, only these small tiles avoid spills
    (16, 32, 32, 4, 2),
    (16, 32, 64, 4, 2),
    (16, 64, 32, 4, 2),
]


def get_int8_configs() -> list[triton.Config]:
    """int8 GEMM tiles: GEMV-shaped (BLOCK_M=16) decode tiles, deeper ones for int8's 1-byte K, then prefill."""
    return [_cfg(*t) for t in _GEMV_TILES + [(16, 32, 256, 4, 4), (16, 64, 256, 8, 3)] + _PREFILL_TILES]


def get_int4_configs() -> list[triton.Config]:
    """int4 GEMM tiles; BLOCK_K must divide the group size (every BLOCK_K here divides 64 and 128)."""
    return [_cfg(*t) for t in _GEMV_TILES + [(16, 128, 128, 8, 3)] + _PREFILL_TILES]


def keep_quant(config: triton.Config, m_bucket: int, a_bytes: int, w_bits: int, group_size: int) -> bool:
    """Whether a quantized-GEMM config fits (shared memory, registers, group alignment) and suits the bucket."""
    kw = config.kwargs
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    if group_size and group_size % bk:
        return False
    if config.num_stages * bk * (bm * a_bytes + bn * w_bits // 8) > SMEM_LIMIT:
        return False
    if (a_bytes == 4) != ((bm, bn, bk) in FP32_TILES):
        return False  # fp32 IEEE dots run on CUDA cores: only small tiles avoid spills, and only fp32 needs them
    if bm > max(16, m_bucket):
        return False
    if m_bucket >= 512 and bm < 64:
        return False
    return True


def _prune_int8(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    kept = [c for c in configs if keep_quant(c, args["M_KEY"], args["X"].element_size(), 8, 0)]
    return kept or configs[:1]


def _prune_int4(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    kept = [c for c in configs if keep_quant(c, args["M_KEY"], args["X"].element_size(), 4, args["GROUP_SIZE"])]
    return kept or configs[:1]


# ---------------------------------------------------------------------------------------------------------
# kernels


# the int8 GEMM is kernels.gemm's body with W_INT8 (codes converted in registers, per-channel scale applied
# once after the K loop), tuned over int8's own tiles; the hooks keep tuning of out=residual from accumulating
_int8_linear_kernel = autotune(
    configs=get_int8_configs(),
    key=["M_KEY", "N", "K", "SPLIT_K"],
    prune_configs_by={"early_config_prune": _prune_int8},
    **RestoreAliasedOutput().kwargs(),
)(gemm_kernel)


@autotune(
    configs=get_int4_configs(),
    key=["M_KEY", "N", "K", "SPLIT_K", "GROUP_SIZE"],
    prune_configs_by={"early_config_prune": _prune_int4},
    **RestoreAliasedOutput().kwargs(),
)
@triton.jit
def _int4_linear_kernel(
    X,  # pointer to the activations, shape (M, K), fp16/bf16/fp32
    W,  # pointer to the packed int4 codes, uint8, shape (N, K // 2); low nibble = even k
    S,  # pointer to the group scales, shape (N, K // GROUP_SIZE)
    Z,  # pointer to the group zero points, shape (N, K // GROUP_SIZE)
    B,  # pointer to the bias, shape (N,) (unused unless HAS_BIAS)
    R,  # pointer to the residual, shape (M, N) (unused unless HAS_RESIDUAL)
    Y,  # pointer to the output, shape (M, N)
    P,  # pointer to the fp32 split-K partials, shape (SPLIT_K, M, N) (unused unless PARTIAL)
    M,  # rows of X and Y (tokens)
    N,  # output features
    K,  # input features (multiple of GROUP_SIZE)
    M_KEY,  # autotune bucket of M (power of two); not used by the kernel body
    SPLIT_K,  # K ranges (grid axis 1); 1 unless PARTIAL
    stride_xm,  # X row stride
    stride_xk,  # X column stride
    stride_wn,  # W row stride (bytes)
    stride_wk,  # W column stride (bytes, one byte = two k)
    stride_sn,  # S and Z row stride
    stride_sg,  # S and Z group stride
    stride_rm,  # R row stride
    stride_rn,  # R column stride
    stride_ym,  # Y row stride
    stride_yn,  # Y column stride
    HAS_BIAS: tl.constexpr,  # add the bias
    APPLY_GELU: tl.constexpr,  # GELU-tanh after the bias
    HAS_RESIDUAL: tl.constexpr,  # add the residual after the activation
    UPCAST: tl.constexpr,  # interpreter only: multiply in fp32 (bf16 tl.dot bug)
    PARTIAL: tl.constexpr,  # split-K: reduce only this program's K range and store it to P (no epilogue)
    GROUP_SIZE: tl.constexpr,  # k per scale/zero group; a multiple of BLOCK_K
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # output columns per tile
    BLOCK_K: tl.constexpr,  # reduction step in k (BLOCK_K // 2 bytes); divides GROUP_SIZE
    GROUP_M: tl.constexpr,  # row tiles per L2 group
):
    offs_m, offs_n, k_lo, k_hi, rows_x, rows_w = tile_setup(
        M, N, K, SPLIT_K, PARTIAL, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
    )
    offs_p = tl.arange(0, BLOCK_K // 2)  # byte (k pair) index within the step
    x_even = (
        X + rows_x[:, None] * stride_xm + (k_lo * BLOCK_K + 2 * offs_p)[None, :] * stride_xk
    )  # (BLOCK_M, BLOCK_K/2)
    w_ptrs = (
        W + rows_w[None, :] * stride_wn + (k_lo * (BLOCK_K // 2) + offs_p)[:, None] * stride_wk
    )  # (BLOCK_K/2, BLOCK_N)
    s_ptrs = S + rows_w * stride_sn  # (BLOCK_N,)
    z_ptrs = Z + rows_w * stride_sn
    # Codes become the exact integers q - zero in the activation dtype (fp32 for the interpreter's bf16, see
    # dot) by bit operations, not int-to-float conversions, which run at a sixteenth of the FMA rate and would
    # cap a decode GEMV well below memory bandwidth (two per byte). Each step lies inside one group (BLOCK_K
    # divides GROUP_SIZE): decode tiles keep the weights exact and scale the step's fp32 partial sum; larger
    # tiles, where a second accumulator would spill, scale the weights (the scale rounded to the dtype).
    if UPCAST:
        DQ: tl.constexpr = tl.float32
    else:
        DQ: tl.constexpr = X.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi):
        g = (k * BLOCK_K) // GROUP_SIZE
        scale = tl.load(s_ptrs + g * stride_sg).to(tl.float32)[None, :]
        zero = (tl.load(z_ptrs + g * stride_sg).to(tl.float32) + magic_base(DQ)).to(DQ)[None, :]  # 2^m + zero
        a_even = tl.load(x_even)
        a_odd = tl.load(x_even + stride_xk)
        packed = tl.load(w_ptrs)
        w_lo = magic_uint_to_float(packed & 0xF, DQ) - zero  # (2^m + q) - (2^m + zero): exact
        w_hi = magic_uint_to_float(packed >> 4, DQ) - zero
        if BLOCK_M * BLOCK_N <= SCALED_PARTIAL_TILE:
            part = dot(a_even, w_lo, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST)
            acc += dot(a_odd, w_hi, part, UPCAST) * scale
        else:
            scale_dq = scale.to(DQ)
            acc = dot(a_even, w_lo * scale_dq, acc, UPCAST)
            acc = dot(a_odd, w_hi * scale_dq, acc, UPCAST)
        x_even += BLOCK_K * stride_xk
        w_ptrs += (BLOCK_K // 2) * stride_wk
    write_tile(
        acc, offs_m, offs_n, M, N, B, R, Y, P, stride_rm, stride_rn, stride_ym, stride_yn,
        HAS_BIAS, APPLY_GELU, HAS_RESIDUAL, PARTIAL,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# formats, launcher and reference


class Int8Format(WeightFormat):
    """int8 codes with per-channel scales: :func:`kernels.gemm.gemm_kernel` with ``W_INT8``."""

    name = "int8"
    arg = "qweight"

    def operands(self, qweight: Int8Weight) -> GemmOperands:
        w = qweight.qweight
        return GemmOperands((w, qweight.scales), w.stride(), {"W_INT8": True})


class Int4Format(WeightFormat):
    """Packed int4 codes with group scales and zero points: :func:`_int4_linear_kernel`."""

    name = "int4"
    arg = "qweight"

    def operands(self, qweight: Int4Weight) -> GemmOperands:
        w, s, z = qweight.qweight, qweight.scales, qweight.zeros
        if s.stride() != z.stride():  # the kernel reads both with one pair of strides
            z = z.contiguous()
            s = s.contiguous()
        return GemmOperands((w, s, z), (*w.stride(), *s.stride()), {"GROUP_SIZE": qweight.group_size})

    def check_config(self, qweight: Int4Weight, config: triton.Config) -> None:
        super().check_config(qweight, config)
        if qweight.group_size % config.kwargs["BLOCK_K"]:
            raise ValueError(f"config BLOCK_K={config.kwargs['BLOCK_K']} does not divide group {qweight.group_size}")


INT8_FORMAT = Int8Format(_int8_linear_kernel, get_int8_configs)
INT4_FORMAT = Int4Format(_int4_linear_kernel, get_int4_configs)


def quant_linear(
    x: torch.Tensor,
    qweight: Int8Weight | Int4Weight,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``act(x @ W.T + bias) + residual`` with W stored as int8 or int4; output ``[M, N]`` in x.dtype.

    ``out`` may be ``residual`` (in-place add); ``split_k`` forces the number of K splits, None picks it;
    ``config`` (one of ``get_int8_configs()`` / ``get_int4_configs()``) runs that tile instead of autotuning.
    """
    if isinstance(qweight, Int8Weight):
        weight_format = INT8_FORMAT
    elif isinstance(qweight, Int4Weight):
        weight_format = INT4_FORMAT
    else:
        raise ValueError(f"qweight must be an Int8Weight or Int4Weight, got {type(qweight).__name__}")
    return weight_format.run(x, qweight, bias, activation, residual, out, split_k=split_k, config=config)


def quant_linear_ref(
    x: torch.Tensor,
    qweight: Int8Weight | Int4Weight,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference: dequantize to fp32, then :func:`kernels.linear.linear_ref`."""
    wide = torch.promote_types(x.dtype, torch.float32)
    y = linear_ref(x.to(wide), qweight.dequantize(wide), bias, activation, residual)
    return y.to(x.dtype)
