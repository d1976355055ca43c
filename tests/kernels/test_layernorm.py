"""LayerNorm (optionally fused with the residual add) against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from kernels.layernorm import MAX_N, layer_norm, layer_norm_ref
from kernels.specs.layernorm import compile_specs
from tests.helpers import DEVICE, rel_err

DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)]


def _params(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    weight = (1.0 + 0.2 * torch.randn(n, device=DEVICE)).to(dtype)
    bias = (0.2 * torch.randn(n, device=DEVICE)).to(dtype)
    return weight, bias


def _ref64(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    h = h.double()
    mean = h.mean(-1, keepdim=True)
    var = h.var(-1, unbiased=False, keepdim=True)
    return (h - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()


@pytest.mark.parametrize("shape", [(1, 64), (7, 1600), (2, 3, 200)])
@pytest.mark.parametrize("fuse_residual", [False, True])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_layer_norm(shape, fuse_residual, dtype, tol):
    n = shape[-1]
    x = (torch.randn(shape, device=DEVICE) * 2 + 0.5).to(dtype)
    residual = torch.randn(shape, device=DEVICE).to(dtype) if fuse_residual else None
    weight, bias = _params(n, dtype)
    eps = 1e-5
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    h_out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) if fuse_residual else None

    y, h = layer_norm(x, weight, bias, eps, residual, out=out, h_out=h_out)

    assert y is out and y.dtype == dtype and y.shape == x.shape
    if fuse_residual:
        assert h is h_out
        assert rel_err(h, x.double() + residual.double()) < tol
    else:
        assert h is x  # no copy
    assert rel_err(y, _ref64(h, weight, bias, eps)) < tol
    y_ref, _ = layer_norm_ref(x, weight, bias, eps, residual)
    assert rel_err(y, y_ref) < tol


def test_layer_norm_strided_rows_and_fp32_params():
    """Rows with a stride larger than N (a column slice) and fp32 LN parameters on fp16 activations."""
    m, n = 5, 96
    base = torch.randn(m, n + 40, device=DEVICE).half()
    x = base[:, 7 : 7 + n]
    residual = torch.randn(m, n, device=DEVICE).half()
    weight, bias = _params(n, torch.float32)
    y, h = layer_norm(x, weight, bias, 1e-5, residual)
    assert rel_err(h, x.double() + residual.double()) < 2e-3
    assert rel_err(y, _ref64(h, weight, bias, 1e-5)) < 2e-3


def test_layer_norm_large_mean():
    """fp32 statistics with a mean far from zero (one-pass variance would cancel catastrophically)."""
    x = torch.randn(3, 1024, device=DEVICE) * 0.1 + 100.0  # one-pass E[x^2] - E[x]^2 in fp32 loses most digits
    weight, bias = _params(1024, torch.float32)
    y, _ = layer_norm(x, weight, bias, 1e-5)
    assert rel_err(y, _ref64(x, weight, bias, 1e-5)) < 1e-3


@pytest.mark.parametrize(
    "case, match",
    [
        ("int_x", "x has dtype"),
        ("weight_shape", "weight"),
        ("residual_shape", "residual shape"),
        ("residual_dtype", "residual has dtype"),
        ("too_wide", "at most"),
        ("eps", "eps"),
        ("h_out_without_residual", "h_out"),
    ],
)
def test_layer_norm_bad_inputs(case, match):
    n = 64
    x = torch.randn(4, n, device=DEVICE)
    weight, bias = _params(n, torch.float32)
    kwargs = {}
    if case == "int_x":
        x = x.to(torch.int32)
    elif case == "weight_shape":
        weight = weight[:-1]
    elif case == "residual_shape":
        kwargs["residual"] = torch.randn(4, n + 1, device=DEVICE)
    elif case == "residual_dtype":
        kwargs["residual"] = torch.randn(4, n, device=DEVICE).half()
    elif case == "too_wide":
        x = torch.randn(1, MAX_N + 1, device=DEVICE)
        weight, bias = _params(MAX_N + 1, torch.float32)
    elif case == "eps":
        kwargs["eps"] = 0.0
    elif case == "h_out_without_residual":
        kwargs["h_out"] = torch.empty_like(x)
    eps = kwargs.pop("eps", 1e-5)
    with pytest.raises(ValueError, match=match):
        layer_norm(x, weight, bias, eps, **kwargs)


def test_compile_specs_cover_every_argument():
    specs = compile_specs()
    assert len({s.name for s in specs}) == len(specs)
    for s in specs:
        args = set(s.fn.arg_names)
        assert set(s.signature) | set(s.constexprs) == args, s.name
        assert not set(s.signature) & set(s.constexprs), s.name
