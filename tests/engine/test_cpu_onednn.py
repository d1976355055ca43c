"""oneDNN's bf16 GEMM behind the CPU GEMM (engine.cpu_onednn): which calls it takes, its fused epilogues against
float64, the machine's default and the environment's choice, and a whole model on it against PyTorch's paths."""

from __future__ import annotations

import random

import pytest
import torch

from engine import SamplingParams, cpu_kernels, cpu_onednn
from tests.helpers import rel_err

needs_onednn = pytest.mark.skipif(
    not (cpu_kernels.available() and cpu_onednn.runs_bf16()),
    reason="oneDNN runs bf16 GEMMs on CPUs with AVX-512 (and the CPU GEMM needs its library)",
)
BF16_ONCE = 8e-3  # one rounding of the fp32 result to bf16, relative to its norm, with room to spare


def bf16_case(m: int, n: int, k: int, bias: bool, gelu: bool, residual: bool):
    w = (torch.randn(n, k) * k**-0.5).bfloat16()
    x = torch.randn(m, k).bfloat16()
    b = torch.randn(n).bfloat16() if bias else None
    r = torch.randn(m, n).bfloat16() if residual else None
    ref = x.double() @ w.double().t() + (0 if b is None else b.double())
    if gelu:
        ref = torch.nn.functional.gelu(ref, approximate="tanh")
    if r is not None:
        ref = ref + r.double()
    return w, x, b, r, ref


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the calls that reach oneDNN."""
    calls = []
    real = cpu_onednn.linear

    def counted(*args):
        calls.append(args[0].shape[0])
        return real(*args)

    monkeypatch.setattr(cpu_onednn, "linear", counted)
    return calls


@needs_onednn
@pytest.mark.parametrize("gelu, residual", [(False, False), (True, False), (False, True)])
def test_matches_float64_with_each_epilogue(gelu, residual, onednn_calls):
    """N often not a multiple of a vector; ``out`` poisoned with NaN: every element is written."""
    m, n, k = random.randint(cpu_onednn.MIN_ROWS, 40), random.randint(1, 90), 16 * random.randint(1, 24)
    w, x, b, r, ref = bf16_case(m, n, k, random.random() < 0.7, gelu, residual)
    out = torch.full((m, n), float("nan")).bfloat16()
    got = cpu_kernels.GemmWeight(w, onednn=True).linear(x, b, gelu, r, out=out)
    assert got is out and onednn_calls == [m]
    assert rel_err(out, ref) < BF16_ONCE


@needs_onednn
def test_which_calls_go_to_onednn(onednn_calls):
    """bf16 activations of MIN_ROWS rows or more, unless GELU and a residual come together; fewer rows, other
    activations, or a weight without ``onednn`` stay on our kernel (the same bits as a weight that never takes it,
    row-major like oneDNN's)."""
    k, n, few = 64, 40, cpu_onednn.MIN_ROWS - 1
    w, x, b, r, _ = bf16_case(cpu_onednn.MIN_ROWS + 3, n, k, True, False, True)
    ours, theirs = cpu_kernels.GemmWeight(w, pack=False, onednn=False), cpu_kernels.GemmWeight(w, onednn=True)
    assert not theirs.packed
    for args in [(x[:few],), (x[:few], b, True), (x.float(),), (x, b, True, r)]:
        assert torch.equal(theirs.linear(*args), ours.linear(*args))
    assert onednn_calls == []
    ours.linear(x, b, True)
    assert onednn_calls == []
    theirs.linear(x[: cpu_onednn.MIN_ROWS], b, True)
    theirs.linear(x, b, False, r)
    assert onednn_calls == [cpu_onednn.MIN_ROWS, x.shape[0]]


@needs_onednn
@pytest.mark.parametrize("asked", [None, "0", "1"])
def test_the_default_follows_the_cpu_unless_the_environment_asks(asked, monkeypatch):
    if asked is None:
        monkeypatch.delenv(cpu_onednn.ENV, raising=False)
    else:
        monkeypatch.setenv(cpu_onednn.ENV, asked)
    expected = {None: cpu_onednn.HAS_AMX, "0": False, "1": True}[asked]
    weight = cpu_kernels.GemmWeight(torch.randn(8, 32).bfloat16())
    assert weight.onednn == expected and weight.packed != expected
    for dtype in (torch.float32, torch.float16):  # oneDNN is for bf16 weights only
        assert not cpu_kernels.GemmWeight(torch.randn(8, 32).to(dtype)).onednn


def test_a_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv(cpu_onednn.ENV, "yes")
    with pytest.raises(ValueError, match="GPT2_TRITON_CPU_ONEDNN='yes'"):
        cpu_onednn.chosen()


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU GEMM needs x86-64 with AVX2 and a C++ compiler")
def test_asking_for_onednn_where_it_cannot_run_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="bf16 weights, not torch.float32"):
        cpu_kernels.GemmWeight(torch.randn(8, 32), onednn=True)
    monkeypatch.setattr(cpu_onednn, "runs_bf16", lambda: False)
    with pytest.raises(ValueError, match="does not run bf16"):
        cpu_kernels.GemmWeight(torch.randn(8, 32).bfloat16(), onednn=True)


def test_linear_refuses_gelu_with_a_residual():
    x = torch.randn(2, 16).bfloat16()
    with pytest.raises(ValueError, match="GELU or a residual"):
        cpu_onednn.linear(x, torch.randn(4, 16).bfloat16(), None, True, torch.randn(2, 4).bfloat16())


@needs_onednn
def test_a_bf16_model_on_onednn_gives_the_log_probs_of_our_kernel(tiny_checkpoint, monkeypatch):
    """A batch that prefills and decodes in steps of MIN_ROWS rows or more on oneDNN's GEMM; the same model on our
    kernel alone scores the tokens it chose (as prompt log-probs)."""
    from engine import LLM

    def model(asked: str):
        monkeypatch.setenv(cpu_onednn.ENV, asked)
        llm = LLM(str(tiny_checkpoint), backend="torch", device="cpu", dtype="bfloat16", progress=False)
        assert llm.model.w.layers[0].attn_weight.onednn == (asked == "1")
        return llm

    prompts = [torch.randint(0, 50257, (random.randint(2, 12),)).tolist() for _ in range(cpu_onednn.MIN_ROWS + 2)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=0)
    outs = [o.outputs[0] for o in model("1").generate(prompts, params, use_tqdm=False)]
    ours = [lp[t] for out in outs for lp, t in zip(out.logprobs, out.token_ids)]
    scoring = SamplingParams(max_tokens=1, prompt_logprobs=0)
    full = [prompt + out.token_ids for prompt, out in zip(prompts, outs)]
    scored = model("0").generate(full, scoring, use_tqdm=False)
    theirs = [
        lp[t] for p, o, r in zip(prompts, outs, scored) for lp, t in zip(r.prompt_logprobs[len(p) :], o.token_ids)
    ]
    assert rel_err(torch.tensor(ours), torch.tensor(theirs)) < 1e-2
