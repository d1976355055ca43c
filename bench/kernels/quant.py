"""Weight-only int8 / int4 GEMMs (dequantized in registers): ours vs the fp16 model on cuBLAS, and ``torch.compile``
of torch's dequantize-then-matmul.

    python bench/kernels/quant.py                          # CUDA: M = 1..16384, int8 and int4 (group 128), 5 layers
    python bench/kernels/quant.py --bits 4 --m 1 16 --layers lm_head
    python bench/kernels/quant.py --dry-run                # CPU: tiny sizes under the Triton interpreter

``torch`` is the unquantized layer (``addmm`` + torch's epilogue on the fp16/bf16 weight): what quantization must beat
to be worth it. ``torch.compile`` compiles the weight's own ``dequantize`` followed by the same GEMM and epilogue: the
quantized model written in torch. Ours is checked against the exactly dequantized weight, the fp16 peer against the
unquantized one. Decode-sized M reads the weights once: there int8 / int4 can approach 2x / ~3.5x fewer bytes.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.harness import Bench, Case, Setup, main  # noqa: E402
from bench.kernels.linear import DRY_M, M_VALUES, gemm_bytes, operands, pick_layers, reference, torch_linear  # noqa: E402
from bench.shapes import Layer  # noqa: E402


def dequantized_linear(x, qweight, bias, activation, residual):
    """Weight-only quantization in torch: dequantize the stored weight, then the fp16 GEMM and epilogue."""
    return torch_linear(x, qweight.dequantize(x.dtype), bias, activation, residual)


def tensor_bytes(obj) -> int:
    """Bytes of the tensors a quantized weight holds (codes, scales, zero points)."""
    names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else list(vars(obj))
    return sum(t.nbytes for t in (getattr(obj, n) for n in names) if isinstance(t, torch.Tensor))


def quantizer(bits: int):
    from kernels.quant import quantize_int4, quantize_int8

    return {8: quantize_int8, 4: quantize_int4}[bits]


def case(bench: Bench, dtype: torch.dtype, m: int, layer: Layer, bits: int) -> Case:
    from kernels.quant import quant_linear

    quantize = quantizer(bits)
    elt = torch.finfo(dtype).bits // 8

    def setup() -> Setup:
        w, bias, x, res = operands(bench, dtype, m, layer)
        qw = quantize(w)
        w_bytes = tensor_bytes(qw)  # the stored format's size: codes, scales, zero points
        case.nbytes = gemm_bytes(m, layer, w_bytes, elt)
        compiled = bench.compile(dequantized_linear)
        act = layer.activation

        def calls(qw, w) -> dict:  # over copies of both weights (see harness.time_calls)
            return {
                "triton": lambda: quant_linear(x, qw, bias, act, res),
                "torch": lambda: torch_linear(x, w, bias, act, res),
                "torch.compile": lambda: compiled(x, qw, bias, act, res),
            }

        def copies() -> dict:
            w2 = w.clone()
            return calls(quantize(w2), w2)

        return Setup(
            calls(qw, w),
            reference(x, qw.dequantize(torch.float32), bias, layer, res),  # exactly the stored weight
            references={"torch": reference(x, w, bias, layer, res)},  # the unquantized layer
            copies=copies,
            copy_bytes=w_bytes,
        )

    case = Case(
        "quant",
        f"int{bits} {layer.name} M={m} K={layer.k} N={layer.n}",
        dtype,
        setup,
        flops=2.0 * m * layer.n * layer.k,
        sweep="M",
        x=m,
        variant=f"int{bits} {layer.name}",
        params=dict(m=m, bits=bits, layer=layer.name),
    )
    return case


def cases(bench: Bench, dtype: torch.dtype, args) -> list[Case]:
    ms = args.m or (DRY_M if bench.dry_run else M_VALUES)
    return [case(bench, dtype, m, layer, bits) for bits in args.bits for layer in pick_layers(bench, args.layers)
            for m in ms]  # fmt: skip


def add_arguments(ap) -> None:
    ap.add_argument("--m", type=int, nargs="+", default=None, help="rows of x (tokens in the step)")
    ap.add_argument("--layers", nargs="+", default=None, help="qkv, attn_out+res, fc+gelu, mlp_out+res, lm_head")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4], choices=[8, 4])


if __name__ == "__main__":
    sys.exit(main("quant", __doc__, cases, add_arguments=add_arguments))
