"""The torch backend on CPU in fp16 and bf16, on both of its 16-bit paths (the hand-written CPU GEMM, and fbgemm's
packed fp16 where that can't run): parity within 2x of transformers' own error in that dtype (as the triton
backend's test_triton_model checks)."""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, SamplingParams, cpu_kernels
from engine.torch_ops import Fp16PackedWeight, TorchOps
from tests.helpers import SMALL, half_precision_errors, make_hf_model, rel_err, save_checkpoint

HALF = [torch.float16, torch.bfloat16]
WEIGHT_CLASS = {"cpu_gemm": cpu_kernels.GemmWeight, "fbgemm": Fp16PackedWeight}  # each path's prepared 16-bit weight


@pytest.fixture(params=list(WEIGHT_CLASS))
def path(request, monkeypatch):
    """The 16-bit path under test: the CPU GEMM, or fbgemm's packed fp16 with the CPU GEMM turned off."""
    if request.param == "cpu_gemm" and not cpu_kernels.available():
        pytest.skip("the CPU GEMM needs x86-64 with AVX2 and a C++ compiler")
    if request.param == "fbgemm":
        monkeypatch.setattr(cpu_kernels, "gemm_supports", lambda weight: False)
    return request.param


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    model = make_hf_model(**SMALL)
    return model, save_checkpoint(model, tmp_path_factory.mktemp("small-gpt2"))


def cpu_llm(path, dtype: torch.dtype) -> LLM:
    return LLM(str(path), backend="torch", dtype=str(dtype).removeprefix("torch."), device="cpu", progress=False)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_error_within_2x_of_transformers(small_model, dtype, path):
    model, checkpoint = small_model
    llm = cpu_llm(checkpoint, dtype)
    assert isinstance(llm.model.w.layers[0].fc_weight, WEIGHT_CLASS[path])  # the path under test, not a fallback
    assert isinstance(llm.model.lm_head, WEIGHT_CLASS[path])
    ids = torch.randint(0, SMALL["vocab_size"], (random.randint(48, SMALL["n_positions"]),)).tolist()
    errors = half_precision_errors(model, llm, ids, dtype)
    print(dtype, errors)
    for ours, theirs in errors.values():
        assert theirs > 0  # the comparison means something: half precision does lose bits
        assert ours <= 2 * theirs


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_decode_matches_its_prefill(small_model, dtype, path):
    """Decode (M = batch through the GEMV) gives the logits a prefill of the same tokens does."""
    _, checkpoint = small_model
    llm = cpu_llm(checkpoint, dtype)
    prompts = [torch.randint(0, SMALL["vocab_size"], (random.randint(2, 20),)).tolist() for _ in range(3)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    for ids, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        tokens = out.outputs[0].token_ids
        decoded = torch.tensor([lp[t] for lp, t in zip(out.outputs[0].logprobs, tokens)])
        full = llm.model.logits(llm.features(ids + tokens)[0]).log_softmax(-1)
        rescored = full[len(ids) - 1 : -1].gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
        assert rel_err(decoded, rescored) < (2e-2 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("activation, with_residual", [(None, False), ("gelu_tanh", False), (None, True)])
def test_packed_linear_epilogues(dtype, activation, with_residual, path):
    """``act(x @ W.T + b) + residual`` through the prepared weight, against float64, at decode and prefill sizes."""
    ops = TorchOps()
    (n, k), m = random.choice([(96, 128), (200, 64), (1000, 128)]), random.choice([1, 3, 8, 37])
    w, b, x = (torch.randn(*s).to(dtype) * 0.5 for s in ((n, k), (n,), (m, k)))
    res = torch.randn(m, n).to(dtype) if with_residual else None
    packed = ops.prepare_weight(w)
    assert isinstance(packed, WEIGHT_CLASS[path])
    out = ops.linear(x, packed, b, activation=activation, residual=res)
    ref = x.double() @ w.double().t() + b.double()
    if activation:
        ref = torch.nn.functional.gelu(ref, approximate="tanh")
    if res is not None:
        ref = ref + res.double()
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_bf16_weight_beyond_fp16_range(path):
    """A bf16 weight fp16 cannot hold: the CPU GEMM reads bf16 itself; fbgemm's path does not pack it through fp16,
    so it stays bf16 ([N, K], torch's GEMV)."""
    w = torch.randn(64, 128).to(torch.bfloat16)
    w[random.randrange(64), random.randrange(128)] = 1e6
    prepared = TorchOps().prepare_weight(w)
    if path == "cpu_gemm":
        assert isinstance(prepared, cpu_kernels.GemmWeight)
    else:
        assert isinstance(prepared, torch.Tensor) and prepared.dtype == torch.bfloat16 and prepared.is_contiguous()
    x = torch.randn(5, 128).to(torch.bfloat16)
    assert rel_err(TorchOps().linear(x, prepared), x.double() @ w.double().t()) < 1e-2
