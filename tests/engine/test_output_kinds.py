"""``SamplingParams.output_kind``: a final-only request returns one output when it finishes, a delta request what is
new at each step; both must add up to exactly what the default (cumulative) outputs end with, whatever stops the
sequence (EOS, a stop token, a stop string, the length), with ``n`` samples, logprobs and prompt logprobs, and
``<|endoftext|>`` inside an output skipped from its text or not. ``detokenize=False``: token ids, no text."""

from __future__ import annotations

import dataclasses
import random

import pytest

from engine import LLMEngine, RequestOutputKind, SamplingParams
from engine.outputs import CompletionOutput, RequestOutput
from tests.helpers import assert_engine_empty, assert_same_completions

KINDS = list(RequestOutputKind)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> LLMEngine:
    return LLMEngine(str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu", block_size=8,
                     progress=False)  # fmt: skip


def random_params() -> SamplingParams:
    """Greedy or seeded (batch-independent, so three copies of a request agree), with every way to stop: EOS made
    likely by a bias (and then sometimes inside the output: ``ignore_eos``), stop tokens and stop strings that random
    text meets."""
    greedy = random.random() < 0.5
    return SamplingParams(
        n=1 if greedy else random.randint(1, 3),
        max_tokens=random.randint(1, 24),
        temperature=0.0 if greedy else 1.0,
        seed=None if greedy else random.randrange(1 << 30),
        stop=random.choice([None, ["e"], [" t", "an"]]),
        stop_token_ids=random.choice([None, [random.randrange(50257) for _ in range(200)]]),
        logit_bias=random.choice([None, {50256: random.uniform(4.0, 8.0)}]),  # EOS now and then
        logprobs=random.choice([None, 0, 2]),
        prompt_logprobs=random.choice([None, 1]),
        ignore_eos=random.random() < 0.3,
        skip_special_tokens=random.choice([True, False]),
    )


def joined(deltas: list[RequestOutput]) -> RequestOutput:
    """A request's delta outputs added up into one cumulative output."""
    first, last = deltas[0], deltas[-1]
    completions = []
    for c in last.outputs:
        parts = [part for out in deltas for part in out.outputs if part.index == c.index]
        logprobs = None if c.logprobs is None else [e for part in parts for e in part.logprobs]
        completions.append(CompletionOutput(c.index, "".join(p.text for p in parts),
                                            [t for p in parts for t in p.token_ids], c.cumulative_logprob,
                                            c.finish_reason, logprobs, c.stop_reason))  # fmt: skip
    return dataclasses.replace(last, outputs=completions, prompt_logprobs=first.prompt_logprobs)


def expected_text(engine: LLMEngine, c: CompletionOutput, params: SamplingParams) -> str:
    """The text of a completion that no stop string cut: its tokens', short of an EOS or stop token that ended it,
    and without the EOS tokens inside it (``ignore_eos``) when they are skipped."""
    ended_by_token = c.finish_reason == "stop"  # EOS (stop_reason None) or a stop token (its id)
    ids = c.token_ids[:-1] if ended_by_token else c.token_ids
    return engine.get_tokenizer().decode(ids, skip_special_tokens=params.skip_special_tokens)


def test_final_only_and_delta_add_up_to_the_cumulative_output(engine):
    """Each request three times in one batch, one per output kind; texts checked against the tokenizer too."""
    requests = [([random.randrange(50257) for _ in range(random.randint(1, 12))], random_params()) for _ in range(12)]
    ends_with_eos = SamplingParams(max_tokens=12, temperature=0.0, min_tokens=random.randint(1, 5),
                                   logit_bias={50256: 100.0})  # EOS as soon as min_tokens allows  # fmt: skip
    eos_inside = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logit_bias={50256: 100.0},
                                 skip_special_tokens=skip) for skip in (True, False)]  # EOS only  # fmt: skip
    requests += [([random.randrange(50257) for _ in range(5)], p) for p in (*eos_inside, ends_with_eos)]
    for i, (prompt, params) in enumerate(requests):
        for kind in KINDS:
            engine.add_request(f"{i}-{kind.value}", prompt, dataclasses.replace(params, output_kind=kind))
    seen: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    assert_engine_empty(engine)
    for i in range(len(requests)):
        cumulative = seen[f"{i}-cumulative"]
        final = seen[f"{i}-final_only"]
        deltas = seen[f"{i}-delta"]
        assert len(final) == 1 and final[0].finished
        assert [out.finished for out in deltas] == [False] * (len(deltas) - 1) + [True]
        assert len(deltas) == len(cumulative)
        assert all(out.prompt_logprobs is None for out in deltas[1:])  # sent once, with the first output
        for index in range(len(deltas[-1].outputs)):  # a sample's finish reason comes with its last tokens
            parts = [c for out in deltas for c in out.outputs if c.index == index]
            last = max(j for j, c in enumerate(parts) if c.token_ids)
            assert all(c.finish_reason is None for c in parts[:last]) and parts[last].finish_reason is not None
        assert_same_completions(final[0], cumulative[-1])
        assert_same_completions(joined(deltas), cumulative[-1])
        params = requests[i][1]
        if not params.stop:
            assert [c.text for c in final[0].outputs] == [expected_text(engine, c, params) for c in final[0].outputs]
    (eos_end,) = seen[f"{len(requests) - 1}-final_only"][0].outputs
    assert (eos_end.finish_reason, eos_end.stop_reason, eos_end.token_ids[-1]) == ("stop", None, 50256)


def test_detokenize_false_returns_the_same_tokens_and_no_text(engine):
    """vLLM's ``detokenize=False`` (its throughput benchmark's choice): the tokens, logprobs and stops of the text
    request, with no text; stop strings need the text, so they are refused."""
    prompt = [random.randrange(50257) for _ in range(6)]
    params = SamplingParams(max_tokens=random.randint(4, 16), temperature=0.0, logprobs=1, ignore_eos=True,
                            skip_special_tokens=False, stop_token_ids=[random.randrange(50257)])  # fmt: skip
    for kind in KINDS:
        engine.add_request(f"text-{kind.value}", prompt, dataclasses.replace(params, output_kind=kind))
        engine.add_request(f"ids-{kind.value}", prompt, dataclasses.replace(params, output_kind=kind, detokenize=False))
    seen: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    for kind in KINDS:
        text, ids = seen[f"text-{kind.value}"], seen[f"ids-{kind.value}"]
        assert [c.token_ids for out in ids for c in out.outputs] == [c.token_ids for out in text for c in out.outputs]
        assert all(c.text == "" for out in ids for c in out.outputs)
        assert any(c.text for out in text for c in out.outputs)
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop=["x"], detokenize=False)
    for name in ("detokenize", "skip_special_tokens"):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: 1})


def test_output_kind_must_be_a_request_output_kind():
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="delta")
