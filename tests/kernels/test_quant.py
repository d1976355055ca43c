"""Weight-only int8 / int4 quantization: the formats, their error, and the in-register-dequantizing GEMMs."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from kernels.gemm import m_key
from kernels.linear import linear_ref
from kernels.quant import (
    FP32_TILES,
    INT4_FORMAT,
    INT8_FORMAT,
    Int4Weight,
    Int8Weight,
    get_int4_configs,
    get_int8_configs,
    keep_quant,
    quant_linear,
    quant_linear_ref,
    quantize_int4,
    quantize_int8,
)
from kernels.specs.quant import compile_specs
from kernels.utils import magic_base, magic_uint_to_float
from tests.helpers import DEVICE, rel_err, tuning_every_config

# The GEMM must equal dequantize-then-matmul; bf16's own output rounding is ~1e-3 (4e-3 in the interpreter,
# which truncates fp32 -> bf16), so it gets the bf16 tolerance.
DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)]
EPILOGUES = [(False, None, False), (True, "gelu_tanh", True)]  # (bias, activation, residual)


def _sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return -20.0 * math.log10(rel_err(w_hat, w))


def _ref64(x, qweight, bias, activation, residual):
    as64 = lambda t: None if t is None else t.double()
    return linear_ref(x.double(), qweight.dequantize(torch.float64), as64(bias), activation, as64(residual))


def _run(m, k, n, dtype, qweight, has_bias, activation, has_residual, split_k=None):
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if has_bias else None
    residual = torch.randn(m, n, device=DEVICE).to(dtype) if has_residual else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    y = quant_linear(x, qweight, bias, activation, residual, out=out, split_k=split_k)
    assert y is out
    return y, _ref64(x, qweight, bias, activation, residual), (x, bias, residual)


# ------------------------------------------------------------------------------------------ formats


def test_int8_quantization_error():
    w = torch.randn(96, 512, device=DEVICE) * 0.02
    q = quantize_int8(w)
    assert q.shape == (96, 512) and q.qweight.dtype == torch.int8 and q.scales.shape == (96,)
    assert q.qweight.abs().max().item() == 127  # every row's extreme maps to the end of the range
    assert _sqnr_db(w, q.dequantize()) > 35.0
    assert q.dequantize(torch.float16).dtype == torch.float16


@pytest.mark.parametrize("group_size", [64, 128])
def test_int4_quantization_error(group_size):
    w = torch.randn(64, 512, device=DEVICE) * 0.02
    q = quantize_int4(w, group_size)
    assert q.shape == (64, 512) and q.qweight.shape == (64, 256) and q.qweight.dtype == torch.uint8
    assert q.scales.shape == (64, 512 // group_size) == q.zeros.shape
    # 16 levels over each group's range: ~20 dB on Gaussian weights; a layout bug would give ~0 dB
    assert _sqnr_db(w, q.dequantize()) > 17.0
    assert (w - q.dequantize()).abs().max() <= q.scales.repeat_interleave(group_size, 1).max() * 0.51


def test_int4_packing_layout():
    """Byte j of a row holds k = 2j in the low nibble and k = 2j + 1 in the high nibble; on-grid weights round-trip."""
    n, k, g = 3, 128, 64
    codes = torch.randint(0, 16, (n, k), device=DEVICE)
    codes[:, 0::g], codes[:, 1::g] = 0, 15  # every group spans the full range, so quantization recovers it
    scales = torch.rand(n, k // g, device=DEVICE) + 0.5
    zeros = torch.randint(0, 16, (n, k // g), device=DEVICE)
    w = (codes - zeros.repeat_interleave(g, 1)) * scales.repeat_interleave(g, 1)
    q = quantize_int4(w, g)
    assert torch.equal(q.unpack().long(), codes)
    assert torch.equal(q.zeros.long(), zeros)
    assert torch.equal((q.qweight & 0xF).long(), codes[:, 0::2])
    assert torch.equal((q.qweight >> 4).long(), codes[:, 1::2])
    assert rel_err(q.dequantize(), w) < 1e-6


def test_int4_group_size_choice():
    """GPT-2 xl's width 1600 is divisible by 64 but not 128: the default picks 64; asking for 128 raises."""
    w = torch.randn(8, 1600, device=DEVICE)
    assert quantize_int4(w).group_size == 64
    assert quantize_int4(torch.randn(8, 1024, device=DEVICE)).group_size == 128
    with pytest.raises(ValueError, match="group_size=128"):
        quantize_int4(w, group_size=128)
    with pytest.raises(ValueError, match="neither"):
        quantize_int4(torch.randn(8, 96, device=DEVICE))
    with pytest.raises(ValueError, match="group_size must be"):
        quantize_int4(w, group_size=32)


def test_weight_classes_validate_and_move():
    q8 = quantize_int8(torch.randn(16, 64, device=DEVICE))
    q4 = quantize_int4(torch.randn(16, 128, device=DEVICE), 64)
    for q in (q8.to(DEVICE), q4.to(DEVICE)):
        assert q.device.type == DEVICE.type
    assert q4.to(DEVICE).shape == (16, 128)
    with pytest.raises(ValueError, match="scales"):
        Int8Weight(q8.qweight, q8.scales[:-1])
    with pytest.raises(ValueError, match="qweight has dtype"):
        Int8Weight(q8.qweight.to(torch.int16), q8.scales)
    with pytest.raises(ValueError, match="zeros has shape"):
        Int4Weight(q4.qweight, q4.scales, q4.zeros[:, :1], 64)
    with pytest.raises(ValueError, match="not divisible"):
        Int4Weight(q4.qweight[:, :48], q4.scales[:, :1], q4.zeros[:, :1], 64)


# ------------------------------------------------------------------------------------------ GEMMs


@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("k, n", [(64, 96), (200, 136)])
@pytest.mark.parametrize("has_bias, activation, has_residual", EPILOGUES)
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_int8_linear(m, k, n, has_bias, activation, has_residual, dtype, tol):
    qweight = quantize_int8(torch.randn(n, k, device=DEVICE) / k**0.5)
    y, ref, _ = _run(m, k, n, dtype, qweight, has_bias, activation, has_residual)
    assert rel_err(y, ref) < tol


@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("k, n, group_size", [(128, 96, 128), (192, 136, 64), (256, 64, 128)])
@pytest.mark.parametrize("has_bias, activation, has_residual", EPILOGUES)
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_int4_linear(m, k, n, group_size, has_bias, activation, has_residual, dtype, tol):
    qweight = quantize_int4(torch.randn(n, k, device=DEVICE) / k**0.5, group_size)
    y, ref, _ = _run(m, k, n, dtype, qweight, has_bias, activation, has_residual)
    assert rel_err(y, ref) < tol


@triton.jit
def _magic_kernel(U, OUT, N: tl.constexpr, DT: tl.constexpr):
    offs = tl.arange(0, N)
    f = magic_uint_to_float(tl.load(U + offs), DT) - magic_base(DT).to(DT)
    tl.store(OUT + offs, f.to(tl.float32))


# The interpreter's bitcast to bf16 is broken (like its bf16 dot): there the kernels dequantize bf16 in fp32.
MAGIC_DTYPES = [tl.float16, tl.float32] + ([tl.bfloat16] if DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("tl_dtype", MAGIC_DTYPES, ids=str)
def test_magic_conversion_is_exact(tl_dtype):
    """The bit trick behind int4 dequantization gives every code 0..127 exactly (int4 uses 0..15)."""
    u = torch.randperm(128, device=DEVICE).to(torch.uint8)
    out = torch.full((128,), float("nan"), device=DEVICE)
    _magic_kernel[(1,)](u, out, N=128, DT=tl_dtype)
    assert torch.equal(out, u.float())


def _tile_name(c) -> str:
    kw = c.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}w{c.num_warps}"


@pytest.mark.parametrize("config", [c for c in get_int4_configs() if c.kwargs["BLOCK_M"] >= 32], ids=_tile_name)
def test_int4_prefill_tiles(config):
    """Prefill tiles, each run by name: the interpreter's autotuner runs only the first config, and tiles past
    SCALED_PARTIAL_TILE (64x128 and up) take the kernel's other branch, scaling the weights themselves."""
    k, n = 256, 136
    group = 128 if config.kwargs["BLOCK_K"] == 128 else 64
    qweight = quantize_int4(torch.randn(n, k, device=DEVICE) / k**0.5, group)
    x = torch.randn(70, k, device=DEVICE).to(torch.float16)
    out = torch.full((70, n), float("nan"), dtype=torch.float16, device=DEVICE)
    quant_linear(x, qweight, out=out, config=config)
    assert rel_err(out, _ref64(x, qweight, None, None, None)) < 1e-3


def test_quant_linear_config_checks():
    q4 = quantize_int4(torch.randn(64, 128, device=DEVICE), 64)
    x = torch.randn(3, 128, device=DEVICE).half()
    with pytest.raises(ValueError, match="not one of the shipped int4 configs"):
        quant_linear(x, q4, config=next(c for c in get_int8_configs() if c not in get_int4_configs()))
    with pytest.raises(ValueError, match="does not divide group 64"):
        quant_linear(x, q4, config=next(c for c in get_int4_configs() if c.kwargs["BLOCK_K"] == 128))


# (kind, K, N, group_size, split_k) with the interpreter's BLOCK_K=64: int8 200 = 4 steps in 3 splits (2, 2, empty)
# plus a K tail, 328 = 6 steps in 2; int4 192 = 3 steps in 2 (2, 1) crossing a 64-group, 640 = 10 steps in 4
# (3, 3, 3, 1) over 128-groups
SPLITS = [("int8", 200, 136, 0, 3), ("int8", 328, 70, 0, 2), ("int4", 192, 96, 64, 2), ("int4", 640, 40, 128, 4)]


@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("kind, k, n, group_size, split_k", SPLITS)
@pytest.mark.parametrize("has_bias, activation, has_residual", EPILOGUES)
@pytest.mark.parametrize("dtype, tol", DTYPES[1:])
def test_quant_linear_split_k(m, kind, k, n, group_size, split_k, has_bias, activation, has_residual, dtype, tol):
    """Split-K (per-split int8 scaling / int4 groups, fp32 partials, reduce + epilogue) equals the reference."""
    w = torch.randn(n, k, device=DEVICE) / k**0.5
    qweight = quantize_int8(w) if kind == "int8" else quantize_int4(w, group_size)
    y, ref, _ = _run(m, k, n, dtype, qweight, has_bias, activation, has_residual, split_k=split_k)
    assert rel_err(y, ref) < tol


def test_quant_linear_split_k_in_place_and_checks():
    """``out=residual`` adds in place when split; a bad or fp32 split_k raises naming split_k."""
    k, n = 256, 48
    for qw in (
        quantize_int8(torch.randn(n, k, device=DEVICE) / 16),
        quantize_int4(torch.randn(n, k, device=DEVICE) / 16),
    ):
        x = torch.randn(3, k, device=DEVICE).half()
        residual = torch.randn(3, n, device=DEVICE).half()
        ref = _ref64(x, qw, None, "gelu_tanh", residual)
        y = quant_linear(x, qw, None, "gelu_tanh", residual, out=residual, split_k=3)
        assert y is residual and rel_err(y, ref) < 1e-3
        with pytest.raises(ValueError, match="split_k must be"):
            quant_linear(x, qw, split_k=-1)
        with pytest.raises(ValueError, match="split_k=2 needs"):
            quant_linear(x.float(), qw, split_k=2)


@pytest.mark.parametrize(
    "m, aliased, dtype",
    [(5, True, torch.float16), (5, False, torch.float16), (5, False, torch.float32), (600, False, torch.float16)],
)
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_every_tuned_config(monkeypatch, kind, m, aliased, dtype):
    """Triton's own tuning path, as on a GPU (see tests/test_linear.py): every kept tile is right, and tuning
    with ``out=residual`` leaves one residual add."""
    k, n, group_size = 256, 136, 128
    weight_format, bits, group = {"int8": (INT8_FORMAT, 8, 0), "int4": (INT4_FORMAT, 4, group_size)}[kind]
    configs = weight_format.configs
    w = torch.randn(n, k, device=DEVICE) / k**0.5
    qw = quantize_int8(w) if kind == "int8" else quantize_int4(w, group_size)
    tol = dict(DTYPES)[dtype]
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    residual = torch.randn(m, n, device=DEVICE).to(dtype)
    ref = _ref64(x, qw, None, "gelu_tanh", residual)
    out = residual if aliased else torch.empty_like(residual)

    def check(run):
        out.fill_(float("nan"))
        run()
        assert rel_err(out, ref) < tol, f"config #{len(timed)}"

    tuned, timed = tuning_every_config(weight_format.kernel, configs(), None if aliased else check)
    monkeypatch.setattr(weight_format, "kernel", tuned)
    y = quant_linear(x, qw, None, "gelu_tanh", residual, out=out, split_k=1)
    assert y is out and rel_err(y, ref) < tol
    assert len(timed) == sum(keep_quant(c, m_key(m), x.element_size(), bits, group) for c in configs()) > 1


def test_quant_linear_ref_and_strided_operands():
    """Strided x / out views and a transposed int8 code matrix are read in place; the torch reference agrees."""
    m, k, n = 5, 128, 72
    q8 = quantize_int8(torch.randn(n, k, device=DEVICE) / k**0.5)
    q8_t = Int8Weight(q8.qweight.t().contiguous().t(), q8.scales)  # column-major codes
    x = torch.randn(m, k + 8, device=DEVICE).half()[:, 4 : 4 + k]
    out_big = torch.full((m, n + 6), float("nan"), dtype=torch.float16, device=DEVICE)
    for qw in (q8_t, quantize_int4(torch.randn(n, k, device=DEVICE) / k**0.5)):
        out = out_big[:, 2 : 2 + n]
        y = quant_linear(x, qw, out=out)
        assert rel_err(y, _ref64(x, qw, None, None, None)) < 1e-3
        assert rel_err(quant_linear_ref(x, qw), _ref64(x, qw, None, None, None)) < 1e-3
        assert out_big[:, :2].isnan().all() and out_big[:, 2 + n :].isnan().all()


@pytest.mark.parametrize(
    "case, match",
    [
        ("plain_tensor", "Int8Weight or Int4Weight"),
        ("k_mismatch", "features"),
        ("activation", "unknown activation"),
        ("residual_dtype", "residual has dtype"),
        ("x_int", "x has dtype"),
    ],
)
def test_quant_linear_bad_inputs(case, match):
    k, n = 64, 32
    qweight = quantize_int8(torch.randn(n, k, device=DEVICE))
    x = torch.randn(3, k, device=DEVICE)
    kwargs = {}
    if case == "plain_tensor":
        qweight = torch.randn(n, k, device=DEVICE)
    elif case == "k_mismatch":
        x = torch.randn(3, k + 2, device=DEVICE)
    elif case == "activation":
        kwargs["activation"] = "silu"
    elif case == "residual_dtype":
        kwargs["residual"] = torch.randn(3, n, device=DEVICE).half()
    elif case == "x_int":
        x = x.to(torch.int8)
    with pytest.raises(ValueError, match=match):
        quant_linear(x, qweight, **kwargs)


def test_configs_and_specs():
    """The interpreter's (first) config fits both group sizes; every dtype x bucket keeps a config on GPU."""
    for configs, bits in ((get_int8_configs(), 8), (get_int4_configs(), 4)):
        first = configs[0].kwargs
        assert 128 % first["BLOCK_K"] == 0 and 64 % first["BLOCK_K"] == 0
        for nbytes in (2, 4):
            for group in (64, 128) if bits == 4 else (0,):
                for m_bucket in (1, 16, 64, 1024):
                    kept = [c for c in configs if keep_quant(c, m_bucket, nbytes, bits, group)]
                    assert kept or (nbytes == 4 and m_bucket >= 512), (bits, nbytes, group, m_bucket)
    assert all(len(t) == 3 for t in FP32_TILES)
    specs = compile_specs()
    assert len({s.name for s in specs}) == len(specs) <= 80
    names = " ".join(s.name for s in specs)
    for kind in ("int8", "int4"):  # the interpreter's first tile also ships split
        for t in ("fp16", "bf16"):
            assert f"{kind}_linear[{t},split-k partial" in names
            assert f"{kind}_linear[fp32,split-k" not in names
    for s in specs:
        assert set(s.signature) | set(s.constexprs) == set(s.fn.arg_names), s.name
