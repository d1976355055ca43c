"""The torch backend's weight-only int8 / int4 (engine.quantization): the Triton kernels' schemes, exactly, run
through PyTorch's CPU GEMMs."""

from __future__ import annotations

import random

import pytest
import torch

from engine.quantization import quantize
from kernels.quant import quantize_int4, quantize_int8
from tests.helpers import rel_err

DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)]


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_matches_the_triton_backends_quantization(mode, dtype, tol):
    """Same codes and scales as kernels.quant, so ``x @ W.T`` equals x times the kernels' dequantized weight."""
    n, k = random.choice([(96, 128), (200, 64 * 5), (64, 768)])
    m = random.randint(1, 9)
    w = torch.randn(n, k).to(dtype)
    x = torch.randn(m, k).to(dtype)
    if w.device.type == "cpu":
        tol = max(tol, 1e-2)  # on CPU the GEMMs compute on bf16 activations and scales (engine.quantization)
    ours = quantize(w, mode)
    theirs = quantize_int8(w) if mode == "int8" else quantize_int4(w)  # group 128 where it divides K, else 64
    ref = x.double() @ theirs.dequantize(torch.float64).t()
    out = ours.matmul(x)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, ref) < tol


def test_bad_mode():
    with pytest.raises(ValueError, match="quantization"):
        quantize(torch.randn(4, 64), "int3")
    with pytest.raises(ValueError, match="int4 needs K"):
        quantize(torch.randn(4, 96), "int4")
