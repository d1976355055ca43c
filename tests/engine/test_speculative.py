"""Speculative decoding by n-gram lookup: the drafts found are the first occurrence's (against a brute-force
search), greedy outputs and log-probs are those of decoding without it (through block boundaries, preemption,
the prefix cache and stop conditions), sampled outputs follow the model's distribution (a chi-square test against
float64 probabilities), and the requests it must not touch are not touched."""

from __future__ import annotations

import random
from array import array

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import LLM, LLMEngine, SamplingParams
from engine.sampling_params import RequestOutputKind
from engine.speculative import NgramProposer, SpeculativeConfig, lookup_drafts
from tests.helpers import (
    EOS,
    assert_samples_follow,
    extended_latest_first,
    greedy_params,
    make_hf_model,
    make_sequence,
    random_prompts,
    rel_err,
    save_checkpoint,
)

SPEC = {"num_speculative_tokens": 4, "prompt_lookup_max": 3}
ENGINE = dict(backend="torch", dtype="float32", device="cpu", block_size=4, progress=False)


# ---------------------------------------------------------------------------------------------- the lookup
def brute_force_drafts(tokens: list[int], k: int, longest: int, shortest: int) -> list[int]:
    for n in range(min(longest, len(tokens) - 1), shortest - 1, -1):
        for i in range(len(tokens) - n):
            if tokens[i : i + n] == tokens[-n:]:
                return tokens[i + n : i + n + k]
    return []


# token values whose 4-byte words share bytes: a match that is not word-aligned must not count
WORDS = [0, 1, 256, 257, 1 << 15, 50256]
WORDY = st.sampled_from(WORDS)


@settings(max_examples=300, deadline=None)
@given(st.lists(WORDY, max_size=40), st.integers(0, 6), st.integers(1, 5), st.integers(1, 5))
def test_lookup_finds_the_first_occurrence_of_the_longest_suffix(tokens, k, a, b):
    shortest, longest = min(a, b), max(a, b)
    words = array("I", tokens).tobytes()
    assert lookup_drafts(words, k, longest, shortest) == brute_force_drafts(tokens, k, longest, shortest)


def test_the_proposer_keeps_each_sequences_words_up_to_date():
    """Tokens arrive a few at a time (prompt, then accepted runs); the proposer's words always hold them all."""
    proposer = NgramProposer(SpeculativeConfig(4, prompt_lookup_max=3))
    seqs = [make_sequence([random.choice(WORDS) for _ in range(random.randint(1, 8))]) for _ in range(3)]
    for _ in range(20):
        seq = random.choice(seqs)
        seq.output_token_ids += [random.choice(WORDS) for _ in range(random.randint(0, 5))]
        tokens = seq.all_token_ids()
        assert proposer.propose(seq, 4) == brute_force_drafts(tokens, 4, 3, 1)


def test_config_errors_name_what_is_wrong():
    for bad, words in [
        ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"num_speculative_tokens": 2, "method": "eagle"}, "method"),
        ({"num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min"),
        ({"num_speculative_tokens": 2, "draft_model": "gpt2"}, "draft_model"),
        ({"prompt_lookup_max": 2}, "num_speculative_tokens"),
        ({"num_speculative_tokens": True}, "num_speculative_tokens"),
        (4, "dict"),
    ]:
        with pytest.raises(ValueError, match=words):
            SpeculativeConfig.parse(bad)
    assert SpeculativeConfig.parse(None) is None


# ---------------------------------------------------------------------------------------------- greedy parity
def random_checkpoint(tmp_path_factory, tokenizer_dir, initializer_range: float):
    torch.manual_seed(random.SystemRandom().randrange(2**31))
    model = make_hf_model(initializer_range=initializer_range)
    return save_checkpoint(model, tmp_path_factory.mktemp("spec-gpt2"), tokenizer_dir)


@pytest.fixture(scope="module", params=[0.02, 0.2], ids=["repeating", "wandering"])
def checkpoint(request, tmp_path_factory, gpt2_tokenizer_dir):
    """A tiny random GPT-2 whose greedy text repeats itself (drafts mostly accepted) or wanders (mostly not)."""
    return random_checkpoint(tmp_path_factory, gpt2_tokenizer_dir, request.param)


@pytest.fixture(scope="module")
def repeating_checkpoint(tmp_path_factory, gpt2_tokenizer_dir):
    return random_checkpoint(tmp_path_factory, gpt2_tokenizer_dir, 0.02)


def assert_same_completions(plain, spec) -> None:
    for a, b in zip(plain, spec, strict=True):
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            assert cb.token_ids == ca.token_ids
            assert (cb.finish_reason, cb.stop_reason, cb.text) == (ca.finish_reason, ca.stop_reason, ca.text)
            la = torch.tensor([d[t] for d, t in zip(ca.logprobs, ca.token_ids)])
            lb = torch.tensor([d[t] for d, t in zip(cb.logprobs, cb.token_ids)])
            assert rel_err(lb, la) < 1e-5


def assert_both_outcomes(llm: LLM) -> None:
    """Drafts were fed, and some were accepted and some rejected."""
    stats = llm.llm_engine.get_stats()
    assert stats.spec_decode_num_drafts > 0
    assert 0 < stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens


def test_greedy_outputs_are_those_without_speculation(checkpoint, request):
    """Through the path each model exercises: the repeating one's accepted drafts, the wandering one's rejected
    ones (it may accept none: a CI run saw 57 drafts and no acceptance)."""
    plain = LLM(str(checkpoint), **ENGINE)
    spec = LLM(str(checkpoint), speculative_config=SPEC, **ENGINE)
    prompts = random_prompts(8)
    params = greedy_params(plain, prompts)
    assert_same_completions(plain.generate(prompts, params, use_tqdm=False),
                            spec.generate(prompts, params, use_tqdm=False))  # fmt: skip
    stats = spec.llm_engine.get_stats()
    if "repeating" in request.node.callspec.id:
        assert stats.spec_decode_num_accepted_tokens > 0
    else:
        assert stats.spec_decode_num_draft_tokens > stats.spec_decode_num_accepted_tokens


def test_greedy_parity_through_preemption_and_the_prefix_cache(checkpoint):
    """A pool too small for the batch (preemptions, drafts cut to the free blocks), then prompts that extend the
    first outputs, served by blocks that speculating steps computed (and whose rejected drafts they overwrote)."""
    plain = LLM(str(checkpoint), **ENGINE)
    spec = LLM(str(checkpoint), speculative_config=SPEC, num_blocks=24, **ENGINE)
    prompts = random_prompts(8)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, logprobs=0)
    first = spec.generate(prompts, params, use_tqdm=False)
    assert_same_completions(plain.generate(prompts, params, use_tqdm=False), first)
    assert spec.llm_engine.get_stats().num_preemptions > 0
    longer = extended_latest_first(prompts, first)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0)
    hits = spec.llm_engine.get_stats().prefix_cache_hits
    assert_same_completions(plain.generate(longer, params, use_tqdm=False),
                            spec.generate(longer, params, use_tqdm=False))  # fmt: skip
    assert spec.llm_engine.get_stats().prefix_cache_hits > hits


def test_blocks_filled_by_speculating_steps_are_cached_under_their_tokens(repeating_checkpoint):
    """Only verified tokens' blocks are registered: a prompt that repeats a finished output hits every full block."""
    spec = LLM(str(repeating_checkpoint), speculative_config=SPEC, **ENGINE)
    prompt = random_prompts(1)[0]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    longer = prompt + spec.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert spec.llm_engine.get_stats().spec_decode_num_accepted_tokens > 0
    before = spec.llm_engine.get_stats().prefix_cache_hits
    spec.generate([longer], SamplingParams(max_tokens=1), use_tqdm=False)
    block_size = ENGINE["block_size"]
    assert spec.llm_engine.get_stats().prefix_cache_hits - before == (len(longer) - 1) // block_size * block_size


def test_drafts_decode_in_the_fixed_shape_buckets(repeating_checkpoint):
    """A step of decodes with drafts runs as decode rows, so on a GPU it replays the CUDA graphs: here their padded
    buckets run eagerly, over a NaN-poisoned pool, and choose the tokens the plain engine does."""
    from engine.cuda_graphs import StaticDecoder

    plain = LLM(str(repeating_checkpoint), **ENGINE)
    spec = LLM(str(repeating_checkpoint), speculative_config=SPEC, max_num_seqs=8, **ENGINE)
    decoder = StaticDecoder(spec.model, spec.kv, 48, spec.device, capture=False)
    spec.runner.static_decoder = decoder
    spec.kv.k.fill_(float("nan"))
    spec.kv.v.fill_(float("nan"))
    rows_per_step = []
    decode = decoder.decode

    def counting(input_ids, positions, slots, block_tables, *lora_slots):
        rows_per_step.append((len(input_ids), len({tuple(t) for t in block_tables})))
        return decode(input_ids, positions, slots, block_tables, *lora_slots)

    decoder.decode = counting
    prompts = random_prompts(6)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    assert_same_completions(plain.generate(prompts, params, use_tqdm=False),
                            spec.generate(prompts, params, use_tqdm=False))  # fmt: skip
    assert any(rows > seqs for rows, seqs in rows_per_step), "no bucket held a sequence's drafts"


def test_streamed_deltas_add_up_to_the_final_output(repeating_checkpoint):
    """Several tokens in one step: a delta holds all of them, with their logprobs."""
    checkpoint = repeating_checkpoint
    engine = LLMEngine(str(checkpoint), speculative_config=SPEC, **ENGINE)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=2,
                            output_kind=RequestOutputKind.DELTA)  # fmt: skip
    prompts = random_prompts(3)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    tokens, texts, logprobs = {}, {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0]
            tokens[out.request_id] = tokens.get(out.request_id, []) + c.token_ids
            texts[out.request_id] = texts.get(out.request_id, "") + c.text
            logprobs[out.request_id] = logprobs.get(out.request_id, []) + c.logprobs
    plain = LLM(str(checkpoint), **ENGINE)
    final = plain.generate(prompts, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=2),
                           use_tqdm=False)  # fmt: skip
    for i, out in enumerate(final):
        c = out.outputs[0]
        assert tokens[str(i)] == c.token_ids and texts[str(i)] == c.text
        assert [sorted(d) for d in logprobs[str(i)]] == [sorted(d) for d in c.logprobs]
    assert engine.get_stats().spec_decode_num_accepted_tokens > 0


def test_requests_whose_rows_depend_on_the_drafts_do_not_speculate(checkpoint):
    """Penalties, no_repeat_ngram_size and seeded sampling: the same tokens as without speculation, no drafts."""
    plain = LLM(str(checkpoint), **ENGINE)
    spec = LLM(str(checkpoint), speculative_config=SPEC, **ENGINE)
    prompts = random_prompts(3)
    seed = random.randrange(2**31)
    params = [
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, no_repeat_ngram_size=2),
        SamplingParams(max_tokens=20, temperature=0.8, ignore_eos=True, seed=seed, top_k=40),
    ]
    a, b = plain.generate(prompts, params, use_tqdm=False), spec.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert spec.llm_engine.get_stats().spec_decode_num_drafts == 0


# ---------------------------------------------------------------------------------------------- sampling
def test_sampled_outputs_follow_the_models_distribution(repeating_checkpoint):
    """Five tokens with top-k 2 from a model whose top tokens recur (so the lookups hit in the output, and about
    half the drafts are accepted): the 32 outcomes' counts in 3000 speculative samples pass a chi-square test
    against float64 probabilities (fails by chance once in 10^4 runs). A verifier that accepted every draft, or
    sampled wrongly after a rejection, shifts far more mass."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(repeating_checkpoint).eval()
    spec = LLM(str(repeating_checkpoint), speculative_config=SPEC, max_num_seqs=256, **ENGINE)
    assert_samples_follow(spec, [random.randrange(EOS) for _ in range(8)], model)
    assert_both_outcomes(spec)
