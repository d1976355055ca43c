"""logit_bias, presence / frequency penalties and min_tokens through ``LLM`` and ``LLMEngine`` (torch backend, the
tiny checkpoint): what they do to greedy runs, that the engine feeds the sampler each sequence's own tokens, that
seeded samples stay batch-independent, and that ids outside the vocabulary are refused up front."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import LLM, SamplingParams
from engine.logits_processing import repeated_ngram_tokens
from tests.helpers import (
    History,
    assert_engine_empty,
    prompt_with_a_repeat_ahead,
    random_ids,
    reference_processed,
)

EOS = 50256


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu", block_size=16, progress=False)


def generate(llm, prompts, params):
    return [out.outputs[0] for out in llm.generate(prompts, params, use_tqdm=False)]


def repeats(tokens: list[int]) -> int:
    return len(tokens) - len(set(tokens))


def test_logit_bias_forces_a_greedy_token_and_shows_in_the_logprobs(llm):
    prompt = random_ids(5, EOS)
    plain = generate(llm, prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].token_ids
    token = random.choice([t for t in range(EOS) if t not in plain])
    for key in (token, str(token)):  # JSON gives string keys
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0, logit_bias={key: 100})
        out = generate(llm, prompt, params)[0]
        assert out.token_ids == [token] * 6
        assert all(-1e-3 < lp[token] <= 0 for lp in out.logprobs)  # the processed distribution: nearly certain
    banned = generate(llm, prompt, SamplingParams(max_tokens=6, temperature=0, logit_bias={plain[0]: -100}))
    assert banned[0].token_ids[0] != plain[0]


def test_frequency_penalty_cuts_greedy_repeats_with_the_engine_feeding_output_counts(llm):
    """Greedy runs of 60 tokens repeat themselves; with frequency_penalty 2 they repeat less. Every step the sampler
    got the raw logits and each sequence's own prompt and outputs so far: its tokens are the argmax of the float64
    reference on exactly those."""
    prompts = [random_ids(random.randint(3, 12), EOS) for _ in range(4)]
    free = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    penalized = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, frequency_penalty=2.0,
                               presence_penalty=random.uniform(-0.5, 0.5))  # fmt: skip
    sampler, steps = llm.llm_engine.sampler, []
    sample = sampler.sample

    def recording(logits, batch, histories):
        snapshot = [(list(h.prompt_token_ids), list(h.output_token_ids)) for h in histories]
        raw = logits.clone()
        tokens, logprobs = sample(logits, batch, histories)
        steps.append((raw, batch.params, snapshot, tokens))
        return tokens, logprobs

    sampler.sample = recording
    try:
        base = generate(llm, prompts, free)
        steps.clear()
        outs = generate(llm, prompts, [penalized, free, penalized, free])  # rows without penalties mixed in
    finally:
        del sampler.sample
    assert sum(repeats(base[i].token_ids) for i in (0, 2)) > 0, "the greedy runs never repeated: nothing to cut"
    assert sum(repeats(outs[i].token_ids) for i in (0, 2)) < sum(repeats(base[i].token_ids) for i in (0, 2))
    assert [outs[i].token_ids for i in (1, 3)] == [base[i].token_ids for i in (1, 3)]
    for raw, params, snapshot, tokens in steps:
        want = reference_processed(raw, params, [History(p, o) for p, o in snapshot], EOS)
        assert tokens.tolist() == want.argmax(-1).tolist()
    for prompt, out in zip(prompts, outs):  # and each step saw the outputs sampled so far
        seen = [o for raw, params, snapshot, tokens in steps for (p, o) in snapshot if p == prompt]
        assert [len(o) for o in seen] == list(range(60)) and seen[-1] == out.token_ids[:-1]


def test_min_tokens_holds_back_a_forced_eos_or_stop_token(llm):
    """EOS (or a stop token) pushed to the top by logit_bias comes right after exactly min_tokens tokens."""
    prompt = random_ids(6, EOS)
    m = random.randint(1, 8)
    stop_token = random.randrange(EOS)
    for params, last, reason in [
        (SamplingParams(max_tokens=m + 5, temperature=0, min_tokens=m, logit_bias={EOS: 100}), EOS, None),
        (SamplingParams(max_tokens=m + 5, temperature=0, min_tokens=0, logit_bias={EOS: 100}), EOS, None),
        (
            SamplingParams(max_tokens=m + 5, min_tokens=m, seed=random.randrange(1 << 30), logit_bias={EOS: 100}),
            EOS,
            None,
        ),  # fmt: skip
        (
            SamplingParams(
                max_tokens=m + 5,
                temperature=0,
                min_tokens=m,
                stop_token_ids=[stop_token],
                logit_bias={str(stop_token): 100},
            ),
            stop_token,
            stop_token,
        ),  # fmt: skip
    ]:
        out = generate(llm, prompt, params)[0]
        assert len(out.token_ids) == params.min_tokens + 1 and out.token_ids[-1] == last
        assert last not in out.token_ids[:-1] and (out.finish_reason, out.stop_reason) == ("stop", reason)
    out = generate(llm, prompt, SamplingParams(max_tokens=m, temperature=0, min_tokens=m, logit_bias={EOS: 100}))
    assert len(out[0].token_ids) == m and EOS not in out[0].token_ids and out[0].finish_reason == "length"


def test_seeded_sampling_with_penalties_is_reproducible_and_batch_independent(llm):
    seed = random.randrange(1 << 30)
    prompt = random_ids(9, EOS)
    params = SamplingParams(
        n=2, max_tokens=16, temperature=1.0, top_k=50, seed=seed, presence_penalty=random.uniform(-2, 2),
        frequency_penalty=random.uniform(-2, 2), repetition_penalty=random.uniform(0.8, 1.5), min_tokens=5,
        logit_bias={t: random.uniform(-3, 3) for t in random_ids(20, EOS)},
    )  # fmt: skip
    alone = llm.generate(prompt, params, use_tqdm=False)[0]
    again = llm.generate(prompt, params, use_tqdm=False)[0]
    others = [random_ids(n, EOS) for n in (3, 17)]
    other_params = [SamplingParams(max_tokens=20, ignore_eos=True),
                    SamplingParams(max_tokens=12, frequency_penalty=1.0, logit_bias={EOS: 5}, seed=seed)]  # fmt: skip
    mixed = llm.generate([others[0], prompt, others[1]], [other_params[0], params, other_params[1]], use_tqdm=False)
    want = [c.token_ids for c in alone.outputs]
    assert [c.token_ids for c in again.outputs] == want and [c.token_ids for c in mixed[1].outputs] == want
    assert want[0] != want[1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=12), st.integers(1, 4))
def test_repeated_ngram_tokens_are_those_that_complete_a_seen_ngram(tokens, n):
    seen = {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}
    completing = {t for t in range(4) if len(tokens) + 1 >= n and tuple((tokens + [t])[len(tokens) + 1 - n :]) in seen}
    assert set(repeated_ngram_tokens(tokens, n)) == completing


@pytest.mark.parametrize("ngram", [1, 2, 3])
def test_no_repeat_ngram_size_greedy_matches_transformers(llm, hf_model, ngram):
    prompt, n = prompt_with_a_repeat_ahead(llm, ngram), random.randint(4, 16)
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, no_repeat_ngram_size=ngram)
    got = generate(llm, prompt, params)[0].token_ids
    x = torch.tensor([prompt])
    with torch.no_grad():
        want = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                 no_repeat_ngram_size=ngram, eos_token_id=None, pad_token_id=0)  # fmt: skip
    assert got == want[0, len(prompt) :].tolist()
    whole = prompt + got
    ngrams = [tuple(whole[i : i + ngram]) for i in range(len(whole) - ngram + 1)]
    new = ngrams[len(prompt) - ngram + 1 :]  # the n-grams that end in a generated token
    assert all(ngrams.count(g) == 1 for g in new)
    plain = generate(llm, prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0].token_ids
    assert plain[0] != got[0]  # the prompt was chosen so that the favourite first token is banned


def test_logit_bias_ids_outside_the_vocabulary_are_refused(llm):
    engine = llm.llm_engine
    V = llm.config.vocab_size
    for bias in ({V: 1.0}, {str(V + random.randrange(1000)): -1.0}):
        with pytest.raises(ValueError, match="logit_bias"):
            engine.add_request("bad", random_ids(3, EOS), SamplingParams(logit_bias=bias))
        with pytest.raises(ValueError, match="logit_bias"):
            llm.generate(random_ids(3, EOS), SamplingParams(logit_bias=bias))
    assert_engine_empty(engine)
    out = generate(llm, random_ids(3, EOS), SamplingParams(max_tokens=2, temperature=0, logit_bias={V - 1: 100}))
    assert out[0].token_ids == [V - 1]  # the last id is fine (and is EOS here: it stops)
