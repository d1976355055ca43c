"""``SamplingParams.prompt_logprobs``: every prompt token's log-probability (and top alternatives) under the model,
as transformers' float64 forward gives them, however the prompt was chunked, and never served from the prefix cache
(cached tokens have no logits), except before ``prompt_logprobs_start``. Preemption and mixed batches are covered by
``test_llm_engine``'s stress test."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from engine import LLM, SamplingParams
from tests.helpers import assert_same_logprobs

VOCAB = 50257


@pytest.fixture(scope="module")
def reference(hf_model):
    """``reference(prompt, k)``: vLLM's prompt logprobs from transformers' forward in float64."""
    model = copy.deepcopy(hf_model).double()

    def prompt_logprobs(prompt: list[int], k: int) -> list[dict[int, float] | None]:
        with torch.no_grad():
            logp = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
        entries: list[dict[int, float] | None] = [None]
        for t in range(1, len(prompt)):
            row = logp[t - 1]
            top = row.topk(k) if k else None
            entry = dict(zip(top.indices.tolist(), top.values.tolist())) if top is not None else {}
            entries.append({**entry, prompt[t]: row[prompt[t]].item()})
        return entries

    return prompt_logprobs


def make_llm(checkpoint, **kw) -> LLM:
    return LLM(str(checkpoint), backend="torch", dtype="float32", device="cpu", block_size=16, progress=False, **kw)


def test_chunked_prompts_give_transformers_prompt_logprobs(tiny_checkpoint, reference):
    llm = make_llm(tiny_checkpoint, max_num_batched_tokens=random.choice([16, 24, 40]), max_num_seqs=8)
    prompts = [[random.randrange(VOCAB) for _ in range(random.randint(1, 90))] for _ in range(6)]
    ks = [random.randint(0, 5) for _ in prompts]
    params = [SamplingParams(max_tokens=random.randint(1, 4), temperature=0, prompt_logprobs=k) for k in ks]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, prompt, k in zip(outs, prompts, ks):
        assert len(out.prompt_logprobs) == len(prompt)
        assert all(len(entry) in (k, k + 1) for entry in out.prompt_logprobs[1:])  # the token joins its top k
        assert_same_logprobs(out.prompt_logprobs, reference(prompt, k), rel=1e-4)
    assert llm.generate(prompts[0], SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt_logprobs is None


def test_prompt_logprobs_bypass_the_prefix_cache(tiny_checkpoint, reference):
    llm = make_llm(tiny_checkpoint)
    prompt = [random.randrange(VOCAB) for _ in range(random.randint(40, 90))]
    greedy = SamplingParams(max_tokens=2, temperature=0)
    llm.generate(prompt, greedy, use_tqdm=False)  # fills the cache
    k = random.randint(0, 3)
    scored = llm.generate(prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=k), use_tqdm=False)[0]
    assert scored.num_cached_tokens == 0
    assert_same_logprobs(scored.prompt_logprobs, reference(prompt, k), rel=1e-4)
    assert llm.generate(prompt, greedy, use_tqdm=False)[0].num_cached_tokens > 0  # the cache could have served it


def test_prompt_logprobs_start_scores_the_tail_and_lets_the_cache_serve_the_rest(tiny_checkpoint, reference):
    """A prompt whose first tokens another request computed: the cache serves the whole blocks before the first
    scored row, every entry before ``prompt_logprobs_start`` is None and every one from it is transformers'."""
    llm = make_llm(tiny_checkpoint, max_num_batched_tokens=random.choice([16, 40, 4096]), max_num_seqs=8)
    prefix = [random.randrange(VOCAB) for _ in range(random.randint(20, 80))]
    prompt = prefix + [random.randrange(VOCAB) for _ in range(random.randint(1, 30))]
    llm.generate(prefix, SamplingParams(max_tokens=1), use_tqdm=False)  # fills the cache with the prefix's blocks
    start, k = random.randint(1, len(prompt)), random.randint(0, 3)
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=k, prompt_logprobs_start=start)
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    assert out.num_cached_tokens == 16 * min((start - 1) // 16, len(prefix) // 16)
    want = [None] * start + reference(prompt, k)[start:]
    assert_same_logprobs(out.prompt_logprobs, want, rel=1e-4)


def test_prompt_logprobs_start_past_the_prompt_is_refused(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, prompt_logprobs_start=4)
    with pytest.raises(ValueError, match="prompt_logprobs_start"):
        llm.generate([1, 2, 3], params, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_logprobs_start"):
        SamplingParams(prompt_logprobs=0, prompt_logprobs_start=0)


@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_bad_prompt_logprobs_is_a_value_error_naming_it(value):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)
