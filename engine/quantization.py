"""Weight-only int8 / int4 linear weights for the ``torch`` backend: a hand-written CPU GEMM, or PyTorch's own.

The schemes are the Triton kernels' (:mod:`kernels.quant`), so both backends quantize a checkpoint alike:
  * int8: symmetric per output channel, ``w[n, k] ~= q[n, k] * scale[n]`` with ``q`` in [-127, 127];
  * int4: asymmetric in groups along K (128, or 64 where 128 does not divide K),
    ``w[n, k] ~= (q[n, k] - zero[n, g]) * scale[n, g]`` with ``q`` in [0, 15].
On CPU, int8 runs the hand-written GEMM of :mod:`engine.cpu_kernels` (int16 activation codes rounded per row, exact
int32 sums against the int8 codes, fp32 scales): 15 ms for a decode step of gpt2-medium's block linears at M = 1
and 30 ms at M = 8 (2 cores, AVX2; ``_weight_int8pack_mm`` took 27 / 76 ms in the same runs). Where that kernel
can't run, and for int4, PyTorch's weight-only kernels do it (``torch._weight_int8pack_mm``,
``torch._weight_int4pack_mm_for_cpu``, the ones gpt-fast uses), which read 8 or 4 bits per weight and convert in
registers; on other devices the weight is dequantized for each matmul (a reference path: the triton backend is the
fast one there).

PyTorch's kernels are vectorized for bf16 activations only: a decode step of gpt2-medium's block linears (2 cores,
AVX2) took 29 ms in int8 and 25 ms in int4 on bf16 activations, against 203 ms (int8, fp16), 253 ms (int8, fp32)
and 353 ms (int4, fp32); the fp32 weights themselves take 63 ms through oneDNN. So on that path the activations of
every model go through bf16 around these GEMMs (a 2e-3 relative rounding, under the int8 weights' own ~8e-3)
and come back in the model's dtype; the scales are kept in bf16 for it. Activations are rounded row by row, so
a row's result never depends on the other rows of the batch (unlike dynamic activation quantization, which
scales the whole batch at once: fbgemm's int8 ``linear_dynamic`` is faster, 19 / 32 ms at M = 1 / 8 against
29 / 107 ms, but 2-7x the error and batch-dependent).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine import cpu_kernels

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (128, 64)  # the first that divides K
# PyTorch's CPU int4 kernel dequantizes ``(q - 8) * scale + offset``; ours is ``(q - zero) * scale``, so
# offset = (8 - zero) * scale.
INT4_MIDPOINT = 8
INT4_CPU_N_MULTIPLE = 16  # the CPU int4 packing needs N divisible by 16 (every GPT-2 linear is); else dequantize
CPU_KERNEL_DTYPE = torch.bfloat16  # the activation dtype PyTorch's CPU weight-only GEMMs are fast in (see above)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype PyTorch's weight-only GEMM (or the dequantized matmul) runs a weight's activations and keeps its
    scales in."""
    return CPU_KERNEL_DTYPE if weight.device.type == "cpu" else weight.dtype


@dataclass
class Int8WeightOnly:
    """``qweight [N, K]`` int8 and ``scales [N]``: fp32 for the CPU GEMM of :mod:`engine.cpu_kernels`, else in the
    dtype the matmul computes in (bf16 for PyTorch's CPU kernel, else the activation dtype)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    kernel: cpu_kernels.GemmWeight | None = field(default=None, repr=False)  # the CPU GEMM's view of the two

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x [M, K]`` in the activation dtype."""
        if self.kernel is not None:
            return self.kernel.matmul(x)
        if x.device.type == "cpu":
            scales = self.scales.to(CPU_KERNEL_DTYPE)
            y = torch._weight_int8pack_mm(x.to(CPU_KERNEL_DTYPE).contiguous(), self.qweight, scales)
            return y.to(x.dtype)
        return x @ self.dequantize(x.dtype).t()


@dataclass
class Int4WeightOnly:
    """4-bit codes in PyTorch's CPU packing (``packed``; ``codes [N, K]`` uint8 instead off CPU, or when N is not a
    multiple of 16) with per-group
    ``scale_offset [K / group_size, N, 2]`` in the dtype the matmul computes in (bf16 when packed for the CPU, else
    the activation dtype): ``(scale, (8 - zero) * scale)``."""

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
            xc = x.to(self.scale_offset.dtype).contiguous()
            return torch._weight_int4pack_mm_for_cpu(xc, self.packed, self.group_size, self.scale_offset).to(x.dtype)
        return x @ self.dequantize(x.dtype).t()


def quantize_int8(weight: torch.Tensor) -> Int8WeightOnly:
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    if cpu_kernels.gemm_supports(q):
        scales = scales.float().contiguous()
        return Int8WeightOnly(q, scales, cpu_kernels.GemmWeight(q, scales))
    return Int8WeightOnly(q, scales.to(_compute_dtype(weight)).contiguous())


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
    if weight.device.type == "cpu" and n % INT4_CPU_N_MULTIPLE == 0:
        out = Int4WeightOnly(scale_offset.to(CPU_KERNEL_DTYPE).contiguous(), group, n, k)
        out.packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    else:
        out = Int4WeightOnly(scale_offset.to(weight.dtype).contiguous(), group, n, k)
        out.codes = codes.to(torch.uint8)
    return out


def quantize(weight: torch.Tensor, mode: str) -> Int8WeightOnly | Int4WeightOnly:
    """Quantize one linear weight ``[N, K]`` (in the activation dtype) for the torch backend."""
    if mode not in MODES:
        raise ValueError(f"quantization must be one of {MODES}, got {mode!r}")
    return quantize_int8(weight) if mode == "int8" else quantize_int4(weight)
