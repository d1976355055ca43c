"""Linear GEMM with fused bias / GELU-tanh / residual epilogue against a float64 reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kernels.gemm import SPLIT_K_MIN_K, choose_split_k, m_key
from kernels.linear import (
    FLOAT_FORMAT,
    get_configs,
    keep,
    linear,
    linear_ref,
)
from kernels.specs.gemm import config_name
from kernels.specs.linear import compile_specs
from kernels.utils import AUTOTUNE_ENV, RestoreAliasedOutput
from tests.helpers import DEVICE, rel_err, tuning_every_config

DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)]
HALF_DTYPES = DTYPES[1:]
# (K, N, split_k) with the interpreter's BLOCK_K=64: 200 = 4 steps split 3 ways (2, 2, and an empty split) plus
# a K tail; 328 = 6 steps (3, 3) with a tail; 1000 = 16 steps split 5 ways (4, 4, 4, 4, 0)
SPLITS = [(200, 136, 3), (328, 70, 2), (1000, 40, 5)]
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


@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("k, n, split_k", SPLITS)
@pytest.mark.parametrize("has_bias, activation, has_residual", EPILOGUES)
@pytest.mark.parametrize("dtype, tol", HALF_DTYPES)
def test_linear_split_k(m, k, n, split_k, has_bias, activation, has_residual, dtype, tol):
    """Split-K partial sums + the reduce/epilogue kernel equal the unsplit GEMM, including uneven/empty splits."""
    x, weight, bias, residual = _operands(m, k, n, dtype, has_bias, has_residual)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    y = linear(x, weight, bias, activation, residual, out=out, split_k=split_k)
    assert y is out
    assert rel_err(y, _ref64(x, weight, bias, activation, residual)) < tol


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("dtype, tol", HALF_DTYPES)
def test_linear_in_place_residual(split_k, dtype, tol):
    """``out=residual`` adds in place (the decoder's residual stream), split or not."""
    x, weight, bias, residual = _operands(5, 200, 72, dtype, True, True)
    ref = _ref64(x, weight, bias, "gelu_tanh", residual)
    y = linear(x, weight, bias, "gelu_tanh", residual, out=residual, split_k=split_k)
    assert y is residual
    assert rel_err(y, ref) < tol


def test_choose_split_k():
    """Decode GEMMs with few tiles split to fill the SMs; prefill, fp32, wide outputs and short K do not."""
    sms = 132  # H200
    s = choose_split_k(1, 1024, 4096, sms, torch.float16)  # GPT-2 medium MLP down-projection at M=1
    assert s > 1 and 4096 // s >= SPLIT_K_MIN_K and 16 * s >= sms  # 16 tiles of 64 columns: >= one wave
    assert choose_split_k(64, 1024, 1024, sms, torch.bfloat16) > 1
    assert choose_split_k(1, 1024, 4096, sms, torch.float32) == 1  # the parity path stays unsplit
    assert choose_split_k(128, 1024, 4096, sms, torch.float16) == 1  # prefill
    assert choose_split_k(1, 50257, 1024, sms, torch.float16) == 1  # LM head: enough tiles already
    assert choose_split_k(1, 1024, 300, sms, torch.float16) == 1  # K too short to split
    assert choose_split_k(1, 1024, 4096, 0, torch.float16) == 1  # no SMs: CPU / interpreter


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
    for split_k in (1,) if dtype == torch.float32 else (1, 2):
        out[:] = float("nan")
        y = linear(x, weight, bias, "gelu_tanh", residual, out=out, split_k=split_k)
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
        ("split_k_zero", "split_k must be"),
        ("split_k_fp32", "split_k=2 needs"),
    ],
)
def test_linear_bad_inputs(case, match):
    x, weight, bias, residual = _operands(4, 32, 16, torch.float32, True, True)
    activation, out, split_k = None, None, None
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
    elif case == "split_k_zero":
        split_k = 0
    elif case == "split_k_fp32":
        split_k = 2
    with pytest.raises(ValueError, match=match):
        linear(x, weight, bias, activation, residual, out=out, split_k=split_k)


def test_configs_and_specs():
    """The interpreter runs the first config, so it must always be allowed; specs name every kernel argument."""
    configs = get_configs()
    for nbytes in (2, 4):
        assert keep(configs[0], 1, nbytes, nbytes)
        for m_bucket in (1, 16, 64, 1024, 16384):
            kept = any(keep(c, m_bucket, nbytes, nbytes) for c in configs)
            # fp32 keeps only 16-row tiles (larger IEEE tiles spill), which are too thin from 512 rows on: there
            # the prune falls back to the first config
            assert kept == (nbytes == 2 or m_bucket < 512), (nbytes, m_bucket)
    specs = compile_specs()
    assert len({s.name for s in specs}) == len(specs)
    names = " ".join(s.name for s in specs)
    for t in ("fp16", "bf16"):  # split-K: the partial GEMM on the first (interpreter / decode) tile, and the reduce
        assert f"linear[{t},split-k partial] BLOCK_M=16 BLOCK_N=64 BLOCK_K=64" in names
        assert f"splitk_epilogue[{t},bias,gelu,residual]" in names
    assert "fp32,split-k" not in names
    big = next(c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 128)
    assert keep(big, 16384, 2, 2, residual=False) and not keep(big, 16384, 2, 2, residual=True)
    assert f"linear[fp16,bias,gelu] {config_name(big)}" in names  # compiled with what it is offered for
    assert f"linear[fp16,bias,gelu,residual] {config_name(big)}" not in names
    for s in specs:
        assert set(s.signature) | set(s.constexprs) == set(s.fn.arg_names), s.name


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("has_residual", [False, True])
@pytest.mark.parametrize("aliased", [False, True])
def test_tuning_hooks_restore_only_an_aliased_output(aliased, has_residual, partial):
    """Autotuning runs a config many times: an in-place residual add (out=residual) is saved and put back, and
    only then, so the other launches' timings carry no copies."""
    hooks = RestoreAliasedOutput()
    y = torch.randn(5, 7, device=DEVICE)
    r = y if aliased else torch.randn(5, 7, device=DEVICE)
    before = y.clone()
    nargs = {"Y": y, "R": r, "HAS_RESIDUAL": has_residual, "PARTIAL": partial}
    hooks.pre_hook(nargs)
    y.add_(torch.randn_like(y))  # what one timed run of the kernel would do
    hooks.post_hook(nargs, exception=None)
    restored = aliased and has_residual and not partial
    assert torch.equal(y, before) == restored
    hooks.pre_hook(nargs, reset_only=True)  # the autotuner's call after tuning must not save anything
    assert hooks.saved is None


@pytest.mark.parametrize(
    "m, has_residual, aliased, split_k, dtype",
    [
        (5, True, True, 1, torch.float16),
        (5, True, True, 2, torch.float16),
        (5, True, False, 1, torch.float16),
        (5, True, False, 1, torch.float32),
        (600, True, False, 1, torch.float16),
        (600, False, False, 1, torch.float16),
    ],
)
def test_every_tuned_config(monkeypatch, m, has_residual, aliased, split_k, dtype):
    """Triton's own tuning path, as on a GPU (the interpreter otherwise runs only the first config): every tile
    the prune keeps for decode (M=5) or prefill (M=600) rows is right, and with ``out=residual`` the tuning
    runs (several per config) still leave exactly one residual add."""
    k, n = 200, 136
    tol = dict(DTYPES)[dtype]
    x, weight, bias, residual = _operands(m, k, n, dtype, True, has_residual)
    ref = _ref64(x, weight, bias, "gelu_tanh", residual)
    out = residual if aliased else torch.empty(m, n, dtype=dtype, device=DEVICE)

    def check(run):
        out.fill_(float("nan"))
        run()
        assert rel_err(out, ref) < tol, f"config #{len(timed)}"

    tuned, timed = tuning_every_config(FLOAT_FORMAT.kernel, get_configs(), None if aliased else check)
    monkeypatch.setattr(FLOAT_FORMAT, "kernel", tuned)
    y = linear(x, weight, bias, "gelu_tanh", residual, out=out, split_k=split_k)
    assert y is out and rel_err(y, ref) < tol
    nbytes = x.element_size()
    assert len(timed) == sum(keep(c, m_key(m), nbytes, nbytes, residual=has_residual) for c in get_configs()) > 1


@pytest.mark.parametrize("knob, expected", [("first", 1), ("", len(get_configs()))])
def test_autotune_knob_keeps_the_first_config(knob, expected):
    """GPT2_TRITON_AUTOTUNE=first (set by gpu_check for its test run) tunes nothing, as the interpreter does."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", AUTOTUNE_ENV)}
    env[AUTOTUNE_ENV] = knob
    code = "import kernels.linear as m; print(len(m._linear_kernel.configs))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == expected
