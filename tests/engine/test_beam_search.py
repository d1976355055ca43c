"""Beam search against transformers: ``LLM.beam_search`` finds the beams, scores and finish reasons that
``generate(num_beams=k, do_sample=False)`` finds, and our pipeline returns what transformers' pipeline returns."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from engine import LLM, BeamSearchParams, SamplingParams, pipeline
from tests.helpers import make_hf_model, prompt_with_a_repeat_ahead, save_checkpoint

EOS = 50256


@pytest.fixture(scope="module")
def eos_model():
    """A tiny random GPT-2 (untied head) whose EOS row is scaled so that EOS is the most likely token at about
    one position in five: hypotheses finish at every length, so the search's bookkeeping of finished beams is
    exercised, not only its ranking."""
    torch.manual_seed(random.SystemRandom().randrange(2**31))
    model = make_hf_model(tie_word_embeddings=False)
    with torch.no_grad():
        logits = model(torch.randint(0, EOS, (8, 32))).logits.flatten(0, 1)
        eos = logits[:, EOS].clone()
        logits[:, EOS] = -float("inf")
        best = logits.max(-1).values
        scale_needed = best[eos > 0] / eos[eos > 0]  # to come first where EOS's logit is positive
        model.lm_head.weight[EOS] *= scale_needed.quantile(0.4)
    return model


@pytest.fixture(scope="module")
def eos_checkpoint(tmp_path_factory, eos_model, gpt2_tokenizer_dir):
    return save_checkpoint(eos_model, tmp_path_factory.mktemp("eos-gpt2"), gpt2_tokenizer_dir)


@pytest.fixture(scope="module")
def llm(eos_checkpoint):
    # blocks of 4: beams cross block boundaries every few steps (new blocks, partial blocks copied on write)
    return LLM(str(eos_checkpoint), backend="torch", dtype="float32", device="cpu", block_size=4, progress=False)


def random_prompt() -> list[int]:
    return [random.randrange(EOS) for _ in range(random.randint(1, 20))]


def hf_beams(model, ids: list[int], params: BeamSearchParams) -> tuple[list[list[int]], list[float]]:
    """transformers' beams after ``ids`` (new tokens, shorter ones padded with EOS) and their scores."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=params.beam_width,
            num_return_sequences=params.beam_width, max_new_tokens=params.max_tokens,
            length_penalty=params.length_penalty, early_stopping=params.early_stopping,
            no_repeat_ngram_size=params.no_repeat_ngram_size,
            eos_token_id=None if params.ignore_eos else EOS, pad_token_id=EOS,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    return [row[len(ids) :].tolist() for row in out.sequences], out.sequences_scores.tolist()


def assert_close_sums(score: float, want: float, length: int, params: BeamSearchParams) -> None:
    """Two scores of a beam of ``length`` tokens, from fp32 logits: their logprob sums agree within fp32 rounding
    of each token's logprob (a relative test fails on beams whose tokens are all near-certain)."""
    assert abs(score - want) * length**params.length_penalty <= 3e-5 * length


def assert_same_search(got, want, params: BeamSearchParams) -> None:
    """Two of our searches found the same beams, with the same scores up to fp32 rounding."""
    for a, b in zip(got, want, strict=True):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
        for x, y in zip(a.sequences, b.sequences):
            assert_close_sums(x.score, y.score, len(x.logprobs), params)


def assert_same_beams(output, prompt: list[int], reference, params: BeamSearchParams) -> None:
    rows, scores = reference
    assert len(output.sequences) == len(rows) == params.beam_width
    for seq, row, score in zip(output.sequences, rows, scores):
        assert seq.tokens[: len(prompt)] == prompt
        new = seq.tokens[len(prompt) :]
        assert row[: len(new)] == new and set(row[len(new) :]) <= {EOS}
        assert seq.finish_reason == ("stop" if new[-1] == EOS and not params.ignore_eos else "length")
        assert len(seq.logprobs) == len(new)
        assert math.isclose(seq.cum_logprob, sum(seq.logprobs), rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(seq.score, seq.cum_logprob / len(new) ** params.length_penalty, rel_tol=1e-9)
        assert_close_sums(seq.score, score, len(new), params)
    assert [s.score for s in output.sequences] == sorted((s.score for s in output.sequences), reverse=True)


@pytest.mark.parametrize(
    "early_stopping, length_penalty",
    [(False, 1.0), (True, 1.0), ("never", 1.0), (False, 0.0), (True, 2.0), ("never", -0.5), (False, -0.5)],
)
def test_beams_scores_and_finish_reasons_match_transformers(llm, eos_model, early_stopping, length_penalty):
    params = BeamSearchParams(random.randint(2, 5), random.randint(6, 16), length_penalty=length_penalty,
                              early_stopping=early_stopping)  # fmt: skip
    prompts = [random_prompt() for _ in range(3)]
    outputs = llm.beam_search(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert_same_beams(output, prompt, hf_beams(eos_model, prompt, params), params)
    assert not llm.llm_engine.has_unfinished_requests() and llm.blocks.usage == 0.0


def test_beams_that_end_in_eos_match_transformers(llm, eos_model):
    """The runs above may all keep beams that reached max_tokens; eight prompts surely keep some that ended."""
    params = BeamSearchParams(random.randint(3, 4), random.randint(8, 16))
    prompts = [random_prompt() for _ in range(8)]
    outputs = llm.beam_search(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert_same_beams(output, prompt, hf_beams(eos_model, prompt, params), params)
    assert "stop" in {seq.finish_reason for out in outputs for seq in out.sequences}


@pytest.mark.parametrize("ngram", [1, 2, 3])
def test_no_repeat_ngram_size_matches_transformers(llm, eos_model, ngram):
    params = BeamSearchParams(random.randint(2, 4), random.randint(4, 10), no_repeat_ngram_size=ngram)
    prompts = [prompt_with_a_repeat_ahead(llm, ngram) for _ in range(4)]
    outputs = llm.beam_search(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert_same_beams(output, prompt, hf_beams(eos_model, prompt, params), params)
    free = llm.beam_search(prompts, dataclasses.replace(params, no_repeat_ngram_size=0), use_tqdm=False)
    assert [o.sequences for o in free] != [o.sequences for o in outputs], "the ban changed nothing"


def test_ignore_eos_runs_every_beam_to_max_tokens(llm, eos_model):
    params = BeamSearchParams(random.randint(2, 4), random.randint(4, 10), ignore_eos=True)
    prompt = random_prompt()
    output = llm.beam_search(prompt, params, use_tqdm=False)[0]
    assert_same_beams(output, prompt, hf_beams(eos_model, prompt, params), params)
    assert all(len(s.tokens) == len(prompt) + params.max_tokens for s in output.sequences)


def test_one_beam_ignoring_eos_is_greedy(llm):
    prompt, n = random_prompt(), random.randint(2, 12)
    beam = llm.beam_search(prompt, BeamSearchParams(1, n, ignore_eos=True), use_tqdm=False)[0].sequences[0]
    greedy = llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
    assert beam.tokens[len(prompt) :] == greedy[0].outputs[0].token_ids
    assert math.isclose(beam.cum_logprob, greedy[0].outputs[0].cumulative_logprob, rel_tol=1e-6)


def test_beams_do_not_depend_on_the_pool_the_cache_or_max_num_seqs(llm, eos_checkpoint):
    """A pool that holds one prompt's beams at a time, no prefix caching, or room for one prompt's beams in
    max_num_seqs: prompts are searched a group at a time, beams fork without the cache; the beams are the same."""
    params = BeamSearchParams(3, random.randint(6, 10))
    prompts = [random_prompt() for _ in range(3)]
    want = llm.beam_search(prompts, params, use_tqdm=False)
    one_prompt = params.beam_width * llm.blocks.blocks_needed(max(map(len, prompts)) + params.max_tokens)
    for kwargs in (dict(num_blocks=one_prompt), dict(enable_prefix_caching=False), dict(max_num_seqs=3)):
        other = LLM(str(eos_checkpoint), backend="torch", dtype="float32", device="cpu", block_size=4,
                    progress=False, **kwargs)  # fmt: skip
        assert_same_search(other.beam_search(prompts, params, use_tqdm=False), want, params)
        assert other.blocks.usage == 0.0


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_a_failure_mid_search_frees_every_block(eos_checkpoint, monkeypatch, fail_at):
    """Prompts of 3 and 20 tokens under a budget of 8 tokens a step (no prefix cache to shorten them): the first
    request finishes (keeping its blocks) while the second is still being computed, then a step fails; nothing
    stays held."""
    llm = LLM(str(eos_checkpoint), backend="torch", dtype="float32", device="cpu", block_size=4, progress=False,
              max_num_seqs=8, max_num_batched_tokens=8, enable_prefix_caching=False)  # fmt: skip
    params, prompts = BeamSearchParams(3, 6), [random_prompt()[:3], (random_prompt() * 20)[:20]]
    want = llm.beam_search(prompts, params, use_tqdm=False)
    execute, calls = llm.runner.execute, []

    def failing(step):
        calls.append(step)
        if len(calls) == fail_at:
            raise RuntimeError("injected")
        return execute(step)

    monkeypatch.setattr(llm.runner, "execute", failing)
    with pytest.raises(RuntimeError, match="injected"):
        llm.beam_search(prompts, params, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests() and llm.blocks.usage == 0.0
    monkeypatch.undo()
    assert_same_search(llm.beam_search(prompts, params, use_tqdm=False), want, params)


def test_text_and_prefix_cache(llm):
    text = "Hello, I'm a language model,"
    stats = llm.llm_engine.get_stats()
    output = llm.beam_search([text], BeamSearchParams(3, 8), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    for seq in output.sequences:
        shown = seq.tokens[:-1] if seq.finish_reason == "stop" else seq.tokens
        assert seq.text == tok.decode(shown) and seq.text.startswith(text)
    after = llm.llm_engine.get_stats()
    assert after.prefix_cache_hits > stats.prefix_cache_hits  # each step's requests reuse the earlier steps' blocks


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(beam_width=0), "beam_width"),
        (dict(beam_width=-3), "beam_width"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
        (dict(no_repeat_ngram_size=1.5), "no_repeat_ngram_size"),
        (dict(beam_width=True), "beam_width"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(ignore_eos="no"), "ignore_eos"),
        (dict(length_penalty=float("nan")), "length_penalty"),
        (dict(length_penalty="1"), "length_penalty"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(early_stopping=1), "early_stopping"),
    ],
)
def test_bad_params_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        BeamSearchParams(**{"beam_width": 2, **fields})


def test_bad_requests_are_refused_and_leave_nothing_behind(llm):
    with pytest.raises(ValueError, match="BeamSearchParams"):
        llm.beam_search("Hello", SamplingParams())
    n_ctx = llm.config.n_positions
    with pytest.raises(ValueError, match=r"prompt 1: .* exceeds the model's context"):
        llm.beam_search([[1, 2], [1] * (n_ctx - 3)], BeamSearchParams(2, 4))
    with pytest.raises(ValueError, match="prompt 0: token id 50257"):
        llm.beam_search([[llm.config.vocab_size]], BeamSearchParams(2, 4))
    assert not llm.llm_engine.has_unfinished_requests() and llm.blocks.usage == 0.0


def test_beams_must_fit_max_num_seqs_and_the_pool(eos_checkpoint):
    def small(**kwargs):
        return LLM(str(eos_checkpoint), backend="torch", dtype="float32", device="cpu", block_size=4,
                   progress=False, **kwargs)  # fmt: skip

    with pytest.raises(ValueError, match="beam_width=3 exceeds max_num_seqs=2"):
        small(max_num_seqs=2).beam_search([1, 2], BeamSearchParams(3, 4))
    with pytest.raises(ValueError, match=r"prompt 0: needs 6 KV blocks \(n=3\) but the cache has 5"):
        small(num_blocks=5).beam_search([1, 2], BeamSearchParams(3, 6))  # 3 beams of 2 + 6 tokens: 2 blocks each


@pytest.fixture(scope="module")
def pipelines(eos_model, eos_checkpoint, gpt2_tokenizer_dir):
    import transformers

    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir))
    theirs = transformers.pipeline("text-generation", model=eos_model, tokenizer=tokenizer, device="cpu")
    return pipeline("text-generation", model=str(eos_checkpoint), device="cpu", progress=False), theirs


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_new_tokens=10, num_beams=4, num_return_sequences=3, early_stopping=True),
        dict(max_length=24, num_beams=3, num_return_sequences=2, return_full_text=False),  # prompts of two lengths
        dict(max_new_tokens=9, num_beams=3, num_return_sequences=3, length_penalty=0.0, return_tensors=True),
        dict(max_new_tokens=12, num_beams=5, no_repeat_ngram_size=2, early_stopping=True),  # "how to generate"
        dict(max_new_tokens=8, num_beams=1, no_repeat_ngram_size=1),  # greedy
    ],
)
def test_pipeline_beam_search_matches_transformers_pipeline(pipelines, kwargs):
    ours, theirs = pipelines
    prompts = ["Hello, I'm a language model,", "The capital of France is"]
    assert ours(prompts, do_sample=False, **kwargs) == theirs(prompts, do_sample=False, pad_token_id=EOS, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_beams=2), "do_sample=True"),  # the pipeline samples by default (GPT-2's task parameters)
        (dict(num_beams=2, do_sample=False, num_return_sequences=3), "num_return_sequences=3"),
        (dict(num_beams=2, do_sample=False, repetition_penalty=1.2), "repetition_penalty"),
        (dict(num_beams=0, do_sample=False), "num_beams"),
        (dict(num_beams=2, do_sample=False, no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    ],
)
def test_pipeline_refuses_what_its_beam_search_cannot_do(pipelines, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipelines[0]("Hello", max_new_tokens=4, **kwargs)
