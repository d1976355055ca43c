"""Linear GEMM with fused bias / GELU-tanh / residual epilogue against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from kernels.linear import compile_specs, get_configs, keep, linear, linear_ref
from tests.conftest import DEVICE, rel_err

DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)]
EPILOGUES = [  # (bias, activation, residual)
    (False, None, False),
    (True, "gelu_tanh", False),
    (False, None, True),
    (True, "gelu_tanh", True),
]


def _operands(m, k, n, dtype, has_bias, has_residual):
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    weight = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if has_bias else None
    residual = torch.randn(m, n, device=DEVICE).to(dtype) if has_residual else None
    return x, weight, bias, residual


def _ref64(x, weight, bias, activation, residual):
    as64 = lambda t: None if t is None else t.double()
    return linear_ref(x.double(), weight.double(), as64(bias), activation, as64(residual))


@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("k, n", [(64, 96), (200, 136)])
@pytest.mark.parametrize("has_bias, activation, has_residual", EPILOGUES)
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_linear(m, k, n, has_bias, activation, has_residual, dtype, tol):
    x, weight, bias, residual = _operands(m, k, n, dtype, has_bias, has_residual)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    y = linear(x, weight, bias, activation, residual, out=out)
    assert y is out
    assert rel_err(y, _ref64(x, weight, bias, activation, residual)) < tol


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_linear_strided_operands(dtype, tol):
    """Column-major weight (TorchOps' CPU layout), x and residual column slices, out a strided view: no copies."""
    m, k, n = 9, 80, 72
    x_big = torch.randn(m, k + 16, device=DEVICE).to(dtype)
    x = x_big[:, 5 : 5 + k]
    weight = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype).t().contiguous().t()
    assert weight.stride() == (1, n)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    residual = torch.randn(m, 2 * n, device=DEVICE).to(dtype)[:, ::2]
    out_big = torch.full((m, n + 8), float("nan"), dtype=dtype, device=DEVICE)
    out = out_big[:, 3 : 3 + n]
    y = linear(x, weight, bias, "gelu_tanh", residual, out=out)
    assert y is out
    assert rel_err(y, _ref64(x, weight, bias, "gelu_tanh", residual)) < tol
    assert out_big[:, :3].isnan().all() and out_big[:, 3 + n :].isnan().all()  # nothing written outside


def test_linear_tied_lm_head_shape():
    """The LM head: tied embedding as weight, no bias, a vocabulary that no block size divides."""
    wte = torch.randn(1031, 64, device=DEVICE).half() * 0.1
    x = torch.randn(3, 64, device=DEVICE).half()
    logits = linear(x, wte)
    assert rel_err(logits, _ref64(x, wte, None, None, None)) < 1e-3


@pytest.mark.parametrize(
    "case, match",
    [
        ("x_3d", "x must be 2-D"),
        ("k_mismatch", "features"),
        ("w_dtype", "weight dtype"),
        ("activation", "unknown activation"),
        ("bias_shape", "bias"),
        ("residual_shape", "residual"),
        ("out_dtype", "out has dtype"),
    ],
)
def test_linear_bad_inputs(case, match):
    x, weight, bias, residual = _operands(4, 32, 16, torch.float32, True, True)
    activation, out = None, None
    if case == "x_3d":
        x = x[None]
    elif case == "k_mismatch":
        weight = weight[:, :-1]
    elif case == "w_dtype":
        weight = weight.half()
    elif case == "activation":
        activation = "relu"
    elif case == "bias_shape":
        bias = bias[:-1]
    elif case == "residual_shape":
        residual = residual.t()
    elif case == "out_dtype":
        out = torch.empty(4, 16, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match=match):
        linear(x, weight, bias, activation, residual, out=out)


def test_configs_and_specs():
    """The interpreter runs the first config, so it must always be allowed; specs name every kernel argument."""
    configs = get_configs()
    for nbytes in (2, 4):
        assert keep(configs[0], 1, nbytes, nbytes)
        for m_bucket in (1, 16, 64, 1024, 16384):
            assert any(keep(c, m_bucket, nbytes, nbytes) for c in configs) or nbytes == 4
    specs = compile_specs()
    assert len({s.name for s in specs}) == len(specs)
    for s in specs:
        assert set(s.signature) | set(s.constexprs) == set(s.fn.arg_names), s.name
