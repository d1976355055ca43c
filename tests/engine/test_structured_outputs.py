"""Structured outputs: sampled completions of a tiny random GPT-2 (which, left alone, writes anything at all) always
match their choice, regex or JSON schema, and end there with EOS; the mask each step applies is exactly the
grammar's; what cannot be asked for is a ``ValueError`` naming it."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch

from engine import LLM, SamplingParams, StructuredOutputsParams

EOS = 50256


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu", progress=False)


def prompts(k: int) -> list[list[int]]:
    return [[random.randrange(EOS) for _ in range(random.randint(1, 12))] for _ in range(k)]


def sample(llm, structured: StructuredOutputsParams, max_tokens: int = 48, k: int = 6, **kw):
    params = SamplingParams(max_tokens=max_tokens, structured_outputs=structured, n=2, logprobs=0,
                            temperature=random.uniform(0.8, 1.5), **kw)  # fmt: skip
    return [c for out in llm.generate(prompts(k), params, use_tqdm=False) for c in out.outputs]


def test_choices(llm):
    choices = random.sample(["yes", "no", "maybe", " a longer answer", "ünïcödé", "42"], 3)
    outs = sample(llm, StructuredOutputsParams(choice=choices))
    assert all(c.text in choices and c.finish_reason == "stop" and c.token_ids[-1] == EOS for c in outs)


def test_regex(llm):
    pattern = r"[0-9]{2,4}-[a-z]{3}( [A-Z][a-z]{1,5})?"  # bounded: every completion must end within max_tokens
    outs = sample(llm, StructuredOutputsParams(regex=pattern))
    assert all(re.fullmatch(pattern, c.text) and c.finish_reason == "stop" for c in outs), [c.text for c in outs]


def test_json_schema(llm):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "mood": {"enum": ["happy", "sad"]},
            "age": {"type": "string", "pattern": "[1-9][0-9]?"},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "mood", "age", "ok"],
        "additionalProperties": False,
    }
    finished = 0
    for structured in (StructuredOutputsParams(json=schema), StructuredOutputsParams(json=json.dumps(schema))):
        for c in sample(llm, structured, max_tokens=64, k=3):
            if c.finish_reason == "length":  # a name of many odd tokens (escapes) can use up the tokens
                continue
            finished += 1
            doc = json.loads(c.text)
            assert set(doc) == {"name", "mood", "age", "ok"} and len(doc["name"]) <= 6
            assert (
                doc["mood"] in ("happy", "sad")
                and re.fullmatch("[1-9][0-9]?", doc["age"])
                and doc["ok"] in (True, False)
            )
    assert finished >= 6  # bounded fields: nearly every completion ends within 64 tokens


def test_a_batch_of_structured_and_free_requests(llm):
    """The mask reaches its own rows only: free greedy requests batched with structured ones choose what they choose
    alone, and the structured ones still match."""
    batch = prompts(6)
    free = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    structured = SamplingParams(max_tokens=6, structured_outputs=StructuredOutputsParams(choice=["x", "yz"]))
    kinds = [random.choice([free, structured]) for _ in batch[:-2]] + [free, structured]
    outs = llm.generate(batch, kinds, use_tqdm=False)
    for prompt, params, out in zip(batch, kinds, outs):
        if params is free:
            alone = llm.generate(prompt, free, use_tqdm=False)[0]
            assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        else:
            assert out.outputs[0].text in ("x", "yz")


def test_preempted_structured_sequences_resume_their_walk(tiny_checkpoint):
    """A pool too small for the batch: preempted sequences recompute their tokens and go on from where their
    grammar was (it is advanced by tokens drawn, never by recomputing them)."""
    small = LLM(str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu", progress=False, block_size=4,
                num_blocks=32)  # fmt: skip
    pattern = r"([a-z]{1,3} ){4,6}[0-9]"
    outs = sample(small, StructuredOutputsParams(regex=pattern), max_tokens=40, k=8)
    assert small.llm_engine.get_stats().num_preemptions > 0
    assert all(re.fullmatch(pattern, c.text) for c in outs if c.finish_reason == "stop")
    assert sum(c.finish_reason == "stop" for c in outs) >= len(outs) // 2


def test_the_mask_is_the_grammars_and_logprobs_see_it(llm):
    """Each step's logprobs put all the mass on the tokens the grammar allows there (the mask acts with the logit
    bias, before the logprobs), and a greedy structured completion is the greedy choice among those tokens."""
    choices = ["red", "green", "blue"]
    structured = StructuredOutputsParams(choice=choices)
    vocab = llm.get_tokenizer().vocab_size
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=20, structured_outputs=structured)
    for out in llm.generate(prompts(4), params, use_tqdm=False):
        c = out.outputs[0]
        grammar = llm.llm_engine.grammar(structured)
        for token, top in zip(c.token_ids, c.logprobs):
            allowed = set(grammar.allowed(vocab).nonzero().flatten().tolist())
            finite = {t for t, lp in top.items() if lp > float("-inf")}
            assert finite <= allowed and top[token] == max(top.values())  # greedy among the allowed
            if len(allowed) <= 20:  # every allowed token is in the top 20: their probabilities sum to 1
                assert finite == allowed and abs(sum(math.exp(top[t]) for t in finite) - 1) < 1e-4
            if token != EOS:
                grammar.advance(token)
        assert c.text in choices


def test_a_grammar_allows_only_continuations_and_reaches_every_choice(llm):
    """Walking each choice's own tokens, against the whole vocabulary: every token allowed extends the text so far
    towards some choice (EOS only once the text is one), and the choice's next token is always among them, with
    choices that are prefixes of others."""
    tok = llm.get_tokenizer()
    choices = ["cat", "cow", "cattle", " a cat", "ca"]
    structured = StructuredOutputsParams(choice=random.sample(choices, len(choices)))
    pieces = {t: tok.token_bytes(t) for t in range(tok.vocab_size) if t != EOS}
    for choice in choices:
        grammar = llm.llm_engine.grammar(structured)
        text = b""
        for token in [*tok.encode(choice), EOS]:
            allowed = set(grammar.allowed(tok.vocab_size).nonzero().flatten().tolist())
            assert token in allowed
            assert all(any(c.encode().startswith(text + pieces[t]) for c in choices) for t in allowed - {EOS})
            assert (EOS in allowed) == (text.decode() in choices)
            if token != EOS:
                grammar.advance(token)
                text += pieces[token]


def test_kept_words_are_the_states_words(llm):
    """The words an index keeps per state are what outlines-core writes for that state, all along a JSON walk
    (each state written fresh, then again from what was kept), for two row widths."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "boolean"}}}
    grammar = llm.llm_engine.grammar(StructuredOutputsParams(json=schema))
    tok = llm.get_tokenizer()
    for token in tok.encode('{"a":"xyz","b":true}'):
        for width in (1571, 1575):
            fresh = torch.zeros(width, dtype=torch.int32)
            grammar.guide.write_mask_into(fresh.data_ptr(), width, 4)
            for _ in range(2):  # written, then copied from what was kept
                row = torch.full((width,), -1, dtype=torch.int32)
                grammar.write_words(row)
                assert torch.equal(row, fresh)
        grammar.advance(token)


def test_unpacking_the_bits_with_numpy_and_without(monkeypatch):
    """Bit ``i`` of word ``j`` is token ``32 j + i``, on numpy's path (the CPU's) and the shifts' (a GPU's)."""
    from engine import structured_outputs

    words = torch.randint(-(2**31), 2**31 - 1, (random.randint(1, 5), random.randint(1, 40)), dtype=torch.int32)
    n = random.randint(1, 32 * words.shape[1])
    want = torch.tensor([[(int(w) >> (t % 32)) & 1 for t, w in enumerate(row.repeat_interleave(32))] for row in words])
    got = structured_outputs.unpack_bits(words, n)
    monkeypatch.setattr(structured_outputs, "np", None)
    assert torch.equal(got, want[:, :n].bool()) and torch.equal(structured_outputs.unpack_bits(words, n), got)


def test_the_mask_over_a_head_wider_or_narrower_than_the_vocabulary(llm):
    """A padded LM head (nanoGPT's 50304) has tokens no grammar knows: disallowed; a narrower one is cut."""
    from engine.logits_processing import mask_disallowed

    grammar = llm.llm_engine.grammar(StructuredOutputsParams(choice=["yes", "no"]))
    allowed = grammar.allowed(50257)
    for width in (50304, 40000):
        logits = torch.randn(2, width)
        mask_disallowed(logits, [1], [grammar])
        n = min(width, 50257)
        assert torch.equal(logits[1, :n].isfinite(), allowed[:n]) and logits[0].isfinite().all()
        assert not logits[1, n:].isfinite().any()


def test_a_vanishing_temperature_keeps_to_the_grammar(llm):
    """A temperature of 1e-246 (the fuzz test's) once overflowed the scaled logits to NaN, whose race drew token 0
    outside the grammar; it is raised to 0.01, as vLLM raises it."""
    assert SamplingParams(temperature=1e-246).temperature == 0.01 and SamplingParams(temperature=0).greedy
    structured = StructuredOutputsParams(regex="[ab]{1,3}")
    params = SamplingParams(max_tokens=8, temperature=1e-246, structured_outputs=structured, n=2)
    outs = [c for out in llm.generate(prompts(3), params, use_tqdm=False) for c in out.outputs]
    assert all(re.fullmatch("[ab]{1,3}", c.text) for c in outs)


def test_what_cannot_be_asked_is_a_value_error_naming_it(llm):
    for kwargs, words in [
        (dict(), "exactly one"),
        (dict(regex="a", choice=["a"]), "exactly one"),
        (dict(choice=[]), "choice"),
        (dict(choice=["a", 3]), "choice"),
        (dict(regex=3), "regex"),
        (dict(json=[1]), "json"),
        (dict(json_object="yes"), "json_object"),
    ]:
        with pytest.raises(ValueError, match=words):
            StructuredOutputsParams(**kwargs)
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a"]), ignore_eos=True)
    with pytest.raises(ValueError, match="structured_outputs.regex"):
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(regex="(unclosed")))
    with pytest.raises(ValueError, match="structured_outputs.json"):
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(json="{not json")))
    assert SamplingParams(structured_outputs={"choice": ["a"]}).structured_outputs == StructuredOutputsParams(
        choice=["a"]
    )


def test_with_speculation_the_structured_request_does_not_speculate(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu", progress=False,
              speculative_config={"num_speculative_tokens": 3})  # fmt: skip
    structured = StructuredOutputsParams(regex=r"(ab){2,5}c")
    outs = sample(llm, structured, k=2)
    assert all(re.fullmatch(r"(ab){2,5}c", c.text) for c in outs)
    assert llm.llm_engine.get_stats().spec_decode_num_drafts == 0
