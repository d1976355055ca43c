"""Fused linear (bias, GELU, residual add in the epilogue): ours vs cuBLAS + torch's epilogue and ``torch.compile``.

    python bench/kernels/linear.py                        # CUDA: M = 1..16384 for GPT-2 Medium's five layers
    python bench/kernels/linear.py --m 1 16 64 --layers qkv lm_head --dtype bfloat16
    python bench/kernels/linear.py --split-k              # tuning: forced split-K depths at M=1 vs the launcher's pick
    python bench/kernels/linear.py --dry-run              # CPU: tiny sizes under the Triton interpreter

``torch`` is ``addmm`` (cuBLAS, bias fused) then ``F.gelu`` and the residual add as separate kernels; ``torch.compile``
of the same code keeps cuBLAS and fuses the epilogue into one Triton kernel. TFLOP/s against M: the roofline rises
with M while the weights dominate the bytes (M up to ~64: decode) and flattens at the matmul rate (prefill).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.harness import Bench, Case, Setup, main  # noqa: E402
from bench.shapes import Layer, model_for  # noqa: E402

M_VALUES, DRY_M = (1, 4, 16, 64, 256, 1024, 4096, 16384), (1, 17)
SPLITS = (1, 2, 4, 8, 16)


def torch_linear(x, w, bias, activation, residual):
    """The peer: cuBLAS GEMM (bias fused by addmm), then torch's separate GELU and residual add."""
    y = torch.addmm(bias, x, w.t()) if bias is not None else torch.mm(x, w.t())
    if activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    if residual is not None:
        y = y + residual
    return y


def operands(bench: Bench, dtype: torch.dtype, m: int, layer: Layer):
    """Random weight ``[N, K]`` (1/sqrt(K) scale), bias, activations ``[M, K]`` and residual of one layer."""
    w = bench.randn(layer.n, layer.k, dtype=dtype, scale=layer.k**-0.5)
    bias = bench.randn(layer.n, dtype=dtype, scale=0.1) if layer.bias else None
    res = bench.randn(m, layer.n, dtype=dtype) if layer.residual else None
    return w, bias, bench.randn(m, layer.k, dtype=dtype), res


def reference(x, w, bias, layer: Layer, res):
    """float32 reference of the fused linear (kernels.linear's own)."""
    from kernels.linear import linear_ref

    f = lambda t: None if t is None else t.float()
    return linear_ref(x.float(), w.float(), f(bias), layer.activation, f(res))


def gemm_bytes(m: int, layer: Layer, w_bytes: float, elt: int) -> float:
    """Weights, activations in, outputs out (and the residual in)."""
    return w_bytes + (m * layer.k + m * layer.n * (2 if layer.residual else 1)) * elt


def case(bench: Bench, dtype: torch.dtype, m: int, layer: Layer) -> Case:
    from kernels.linear import linear

    def setup() -> Setup:
        w, bias, x, res = operands(bench, dtype, m, layer)
        compiled = bench.compile(torch_linear)
        act = layer.activation

        def calls(w) -> dict:  # over a copy of the weight: the operand a decode step reads from device memory
            return {
                "triton": lambda: linear(x, w, bias, act, res),
                "torch": lambda: torch_linear(x, w, bias, act, res),
                "torch.compile": lambda: compiled(x, w, bias, act, res),
            }

        return Setup(calls(w), reference(x, w, bias, layer, res), copies=lambda: calls(w.clone()), copy_bytes=w.nbytes)

    elt = torch.finfo(dtype).bits // 8
    return Case(
        "linear",
        f"{layer.name} M={m} K={layer.k} N={layer.n}",
        dtype,
        setup,
        flops=2.0 * m * layer.n * layer.k,
        nbytes=gemm_bytes(m, layer, layer.n * layer.k * elt, elt),
        sweep="M",
        x=m,
        variant=layer.name,
        params=dict(m=m, layer=layer.name),
    )


def split_k_case(bench: Bench, dtype: torch.dtype, layer: Layer, split: int) -> Case:
    """M=1 with ``split_k`` forced (``triton-split``) against the launcher's own pick (``triton``)."""
    from kernels.linear import choose_split_k, linear, sm_count

    pick = choose_split_k(1, layer.n, layer.k, sm_count(bench.device), dtype)

    def setup() -> Setup:
        w, bias, x, res = operands(bench, dtype, 1, layer)
        forced = functools.partial(linear, split_k=split)

        def calls(w) -> dict:
            act = layer.activation
            return {
                "triton-split": lambda: forced(x, w, bias, act, res),
                "triton": lambda: linear(x, w, bias, act, res),
            }

        return Setup(calls(w), reference(x, w, bias, layer, res), copies=lambda: calls(w.clone()), copy_bytes=w.nbytes)

    return Case(
        "linear",
        f"{layer.name} M=1 N={layer.n} K={layer.k} split {split} vs {pick}",
        dtype,
        setup,
        nbytes=layer.n * layer.k * torch.finfo(dtype).bits // 8,
        sweep="split_k",
        x=split,
        variant=layer.name,
        params=dict(layer=layer.name, split=split, pick=pick),
    )


def split_k_cases(bench: Bench, dtype: torch.dtype, layers: list[Layer]) -> list[Case]:
    """Every depth but the launcher's pick, where each split still covers 64 of K."""
    from kernels.linear import choose_split_k, sm_count

    out = []
    for layer in layers:
        pick = choose_split_k(1, layer.n, layer.k, sm_count(bench.device), dtype)
        out += [split_k_case(bench, dtype, layer, s) for s in SPLITS if s != pick and layer.k // s >= 64]
    return out


def pick_layers(bench: Bench, names: list[str] | None) -> list[Layer]:
    model = model_for(bench.dry_run)
    return [model.layer(n) for n in names] if names else model.layers()


def cases(bench: Bench, dtype: torch.dtype, args) -> list[Case]:
    layers = pick_layers(bench, args.layers)
    if args.split_k:
        return split_k_cases(bench, dtype, layers)
    return [case(bench, dtype, m, layer) for layer in layers for m in args.m or (DRY_M if bench.dry_run else M_VALUES)]


def add_arguments(ap) -> None:
    ap.add_argument("--m", type=int, nargs="+", default=None, help="rows of x (tokens in the step)")
    ap.add_argument("--layers", nargs="+", default=None, help="qkv, attn_out+res, fc+gelu, mlp_out+res, lm_head")
    ap.add_argument("--split-k", action="store_true", help="the split-K tuning sweep at M=1 instead")


if __name__ == "__main__":
    sys.exit(main("linear", __doc__, cases, add_arguments=add_arguments))
