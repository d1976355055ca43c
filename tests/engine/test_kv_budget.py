"""The KV pool's budget (:mod:`engine.kv_budget`): vLLM's ``gpu_memory_utilization`` rule, and the profile run behind
it, which must run the step it claims to measure. Its memory reading is CUDA's (``test_triton_model``'s GPU test
checks that it covers a real step)."""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM
from engine.kv_budget import (
    CPU_KV_CACHE_BYTES,
    GPU_KV_CACHE_FRACTION,
    kv_budget,
    kv_budget_on_gpu,
    worst_case_step,
    worst_case_tokens,
)
from tests.helpers import DEVICE, SMALL, make_hf_model, rel_err, save_checkpoint


def test_kv_budget_under_gpu_memory_utilization(monkeypatch):
    """vLLM's rule: the fraction of the whole device, less what is in use already (weights, other processes) and
    less the largest step's peak, measured before the device is asked what is free (its memory is free again then).
    The device is faked: on CPU the engine refuses the argument (test_api)."""
    total = random.randint(40, 140) << 30
    used, step = random.randint(1, 10) << 30, random.randint(1, 3 << 30)
    assert kv_budget_on_gpu(total - used, total, 0.5) == total // 2 - used
    assert kv_budget_on_gpu(total - used, total, 1.0, step) == total - used - step
    calls = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: calls.append("free?") or (total - used, total))
    measure = lambda: calls.append("step") or step  # noqa: E731
    fraction = random.uniform(0.5, 1.0)
    got = kv_budget(torch.device("cuda"), None, fraction, measure)
    assert (got, calls) == (int(fraction * total) - used - step, ["step", "free?"])
    with pytest.raises(ValueError, match=r"leaves nothing for the KV cache: .* the largest step needs"):
        kv_budget(torch.device("cuda"), None, (used + step - 1) / total, measure)


def test_kv_budget_defaults_profile_nothing_and_bad_fractions_are_refused(monkeypatch):
    def never():
        pytest.fail("profiled a step without gpu_memory_utilization")

    free, total, nbytes = random.randint(1, 70) << 30, 140 << 30, random.randint(1, 1 << 34)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, total))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kv_budget(cpu, nbytes, None, never) == kv_budget(cuda, nbytes, None, never) == nbytes
    assert kv_budget(cpu, None, None, never) == CPU_KV_CACHE_BYTES
    assert kv_budget(cuda, None, None, never) == int(free * GPU_KV_CACHE_FRACTION)
    for bad in (0, 0.0, -0.5, 1.01, True, "0.9", float("nan")):
        with pytest.raises(ValueError, match="gpu_memory_utilization must be a fraction in"):
            kv_budget(cuda, None, bad, never)
    with pytest.raises(ValueError, match="not both"):
        kv_budget(cuda, nbytes, 0.9, never)
    with pytest.raises(ValueError, match="on cpu use kv_cache_memory"):
        kv_budget(cpu, None, 0.9, never)


def test_worst_case_tokens_fill_the_budget_in_longest_prompts():
    num_tokens, max_len = random.randint(1, 5000), random.randint(1, 1024)
    prompts = worst_case_tokens(num_tokens, max_len, 50257)
    lengths = [len(p) for p in prompts]
    assert sum(lengths) == num_tokens and all(n == max_len for n in lengths[:-1]) and 0 < lengths[-1] <= max_len
    assert all(0 <= t < 50257 for p in prompts for t in p)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_worst_case_step_is_the_model_s_forward(tmp_path, backend):
    """The profile's logits are transformers' for its prompts (drawn again from the same seed), every row of them,
    after the sampler's pass over them."""
    model = make_hf_model(**SMALL)
    llm = LLM(str(save_checkpoint(model, tmp_path)), backend=backend, dtype="float32", device=DEVICE, progress=False)
    max_len = random.randint(8, SMALL["n_positions"])
    num_tokens, max_num_seqs = random.randint(max_len + 1, 3 * max_len), random.randint(1, 300)
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    prompts = worst_case_tokens(num_tokens, max_len, SMALL["vocab_size"])
    torch.manual_seed(seed)
    logits = worst_case_step(llm.llm_engine.model, num_tokens, max_num_seqs, max_len)
    with torch.no_grad():
        want = torch.cat([model(torch.tensor([p])).logits[0].double() for p in prompts])
    assert logits.shape == want.shape and logits.dtype == torch.float32
    assert rel_err(logits.cpu(), want) < (1e-5 if backend == "torch" else 1e-4)  # test_triton_model's bound
