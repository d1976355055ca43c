"""GELU-tanh (GPT-2's gelu_new) against the written-out formula in float64."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.gelu import gelu, gelu_ref
from kernels.specs.gelu import compile_specs
from tests.helpers import DEVICE, rel_err

DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)]


def _gelu64(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's formula in float64, 0.5 x (1 + tanh(u)), rewritten as x sigmoid(2u) so the tail doesn't cancel."""
    x = x.double()
    return x * torch.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))


def test_reference_is_gpt2_formula():
    x = torch.randn(4096, dtype=torch.float64) * 2
    tanh_form = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    assert rel_err(_gelu64(x), tanh_form) < 1e-14
    assert rel_err(gelu_ref(x), torch.nn.functional.gelu(x, approximate="tanh")) < 1e-14


@pytest.mark.parametrize("shape", [(1,), (7, 333), (2, 3, 1025)])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_gelu(shape, dtype, tol):
    x = torch.randn(shape, device=DEVICE).to(dtype)  # |x| > 4.3 would reach fp16 subnormals (see the tail test)
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    y = gelu(x, out=out)
    assert y is out
    assert rel_err(y, _gelu64(x)) < tol
    assert rel_err(y, gelu_ref(x)) < tol


def test_gelu_large_magnitudes_and_noncontiguous():
    """Tails: exp overflow must give 0 (x << 0) and x (x >> 0), never NaN; strided inputs are handled."""
    x = torch.linspace(-60, 60, 2 * 501, device=DEVICE).reshape(501, 2).t()  # non-contiguous view
    y = gelu(x)
    assert torch.isfinite(y).all()
    assert rel_err(y, _gelu64(x)) < 1e-6
    assert y[0, 0].item() == 0.0 and y[1, -1].item() == pytest.approx(60.0)
    # the negative tail elementwise, down to x = -9 (gelu ~ -1e-28; fp32 underflows near x ~ -9.6)
    t = torch.linspace(-9.0, -3.0, 61, device=DEVICE)
    assert ((gelu(t).double() - _gelu64(t)).abs() <= 1e-5 * _gelu64(t).abs()).all()


@pytest.mark.parametrize("case", ["int", "out_shape", "out_dtype"])
def test_gelu_bad_inputs(case):
    x = torch.randn(4, 8, device=DEVICE)
    out = None
    if case == "int":
        x = x.to(torch.int64)
    elif case == "out_shape":
        out = torch.empty(4, 9, device=DEVICE)
    elif case == "out_dtype":
        out = torch.empty(4, 8, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="x has dtype|out"):
        gelu(x, out=out)


def test_compile_specs_cover_every_argument():
    for s in compile_specs():
        assert set(s.signature) | set(s.constexprs) == set(s.fn.arg_names), s.name
