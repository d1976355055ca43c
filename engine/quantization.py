"""Weight-only int8 / int4 linear weights for the ``torch`` backend, on PyTorch's own weight-only GEMMs.

The schemes are the Triton kernels' (:mod:`kernels.quant`), so both backends quantize a checkpoint alike:
  * int8: symmetric per output channel, ``w[n, k] ~= q[n, k] * scale[n]`` with ``q`` in [-127, 127];
  * int4: asymmetric in groups along K (128, or 64 where 128 does not divide K),
    ``w[n, k] ~= (q[n, k] - zero[n, g]) * scale[n, g]`` with ``q`` in [0, 15].
On CPU they run PyTorch's weight-only kernels (``torch._weight_int8pack_mm``, ``torch._weight_int4pack_mm_for_cpu``,
the ones gpt-fast uses), which read 8 or 4 bits per weight and convert in registers; on other devices the
weight is dequantized for each matmul (a reference path: the triton backend is the fast one there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (128, 64)  # the first that divides K
# PyTorch's CPU int4 kernel dequantizes ``(q - 8) * scale + offset``; ours is ``(q - zero) * scale``, so
# offset = (8 - zero) * scale.
INT4_MIDPOINT = 8
INT4_CPU_N_MULTIPLE = 16  # the CPU int4 packing needs N divisible by 16 (every GPT-2 linear is); else dequantize


@dataclass
class Int8WeightOnly:
    """``qweight [N, K]`` int8 and ``scales [N]`` in the activation dtype."""

    qweight: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x [M, K]`` in the activation dtype."""
        if x.device.type == "cpu":
            return torch._weight_int8pack_mm(x.contiguous(), self.qweight, self.scales)
        return x @ self.dequantize(x.dtype).t()


@dataclass
class Int4WeightOnly:
    """4-bit codes in PyTorch's CPU packing (``packed``; ``codes [N, K]`` uint8 instead off CPU, or when N is not a
    multiple of 16) with per-group
    ``scale_offset [K / group_size, N, 2]`` in the activation dtype: ``(scale, (8 - zero) * scale)``."""

    scale_offset: torch.Tensor
    group_size: int
    n: int
    k: int
    packed: torch.Tensor | None = None
    codes: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.codes is None:
            raise ValueError("this int4 weight is packed for the CPU kernel; dequantize needs its codes")
        scale, offset = (t.float().t().repeat_interleave(self.group_size, dim=1) for t in self.scale_offset.unbind(-1))
        return ((self.codes.float() - INT4_MIDPOINT) * scale + offset).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, self.group_size, self.scale_offset)
        return x @ self.dequantize(x.dtype).t()


def quantize_int8(weight: torch.Tensor) -> Int8WeightOnly:
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8WeightOnly(q.contiguous(), scales.to(weight.dtype).contiguous())


def quantize_int4(weight: torch.Tensor) -> Int4WeightOnly:
    n, k = weight.shape
    group = next((g for g in INT4_GROUP_SIZES if k % g == 0), None)
    if group is None:
        raise ValueError(f"int4 needs K divisible by 64 or 128, got a weight of shape {tuple(weight.shape)}")
    wg = weight.float().reshape(n, k // group, group)
    lo = wg.amin(dim=-1).clamp(max=0.0)  # 0 stays exactly representable
    hi = wg.amax(dim=-1).clamp(min=0.0)
    scales = ((hi - lo) / 15.0).clamp(min=1e-12)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    codes = torch.round(wg / scales[..., None] + zeros[..., None]).clamp(0, 15).reshape(n, k)
    scale_offset = torch.stack((scales, (INT4_MIDPOINT - zeros) * scales), dim=-1).transpose(0, 1)
    out = Int4WeightOnly(scale_offset.to(weight.dtype).contiguous(), group, n, k)
    if weight.device.type == "cpu" and n % INT4_CPU_N_MULTIPLE == 0:
        out.packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    else:
        out.codes = codes.to(torch.uint8)
    return out


def quantize(weight: torch.Tensor, mode: str) -> Int8WeightOnly | Int4WeightOnly:
    """Quantize one linear weight ``[N, K]`` (in the activation dtype) for the torch backend."""
    if mode not in MODES:
        raise ValueError(f"quantization must be one of {MODES}, got {mode!r}")
    return quantize_int8(weight) if mode == "int8" else quantize_int4(weight)
