"""The profile run behind ``gpu_memory_utilization`` (:mod:`engine.memory_profile`): it must run the step it claims
to measure. Its memory reading is CUDA's (``test_triton_model``'s GPU test checks it covers a real step)."""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM
from engine.memory_profile import worst_case_step, worst_case_tokens
from tests.helpers import DEVICE, make_hf_model, rel_err, save_checkpoint

SMALL = dict(n_embd=128, n_head=2, n_layer=2, vocab_size=1000, n_positions=64)


def test_worst_case_tokens_fill_the_budget_in_longest_prompts():
    num_tokens, max_len = random.randint(1, 5000), random.randint(1, 1024)
    prompts = worst_case_tokens(num_tokens, max_len, 50257)
    lengths = [len(p) for p in prompts]
    assert sum(lengths) == num_tokens and all(n == max_len for n in lengths[:-1]) and 0 < lengths[-1] <= max_len
    assert all(0 <= t < 50257 for p in prompts for t in p)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_worst_case_step_is_the_model_s_forward(tmp_path, backend):
    """The profile's logits are transformers' for its prompts (drawn again from the same seed), every row of them;
    its 1-block cache stores nothing and the sampler pass leaves them as they are."""
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
