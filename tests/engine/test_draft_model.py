"""Speculative decoding with a draft model: greedy outputs and log-probs are those of decoding without it, whatever
the draft (the target itself, a noisy copy, another shape), through forks, preemption and the prefix cache;
sampled outputs follow the target's distribution, and rejection sampling lands the drafts of a draft that agrees;
the draft's own KV cache holds, after every step, the K/V that transformers computes for each sequence's tokens; a
draft that cannot serve the target is refused by name."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from engine import LLM, LLMEngine, SamplingParams
from engine.speculative import SpeculativeConfig
from tests.helpers import (
    EOS,
    assert_same_completions,
    assert_samples_follow,
    extended_latest_first,
    greedy_params,
    make_hf_model,
    random_prompts,
    save_checkpoint,
)

ENGINE = dict(backend="torch", dtype="float32", device="cpu", block_size=4, progress=False)
NUM_DRAFTS = 4


def spec_config(draft) -> dict:
    return {"model": str(draft), "num_speculative_tokens": NUM_DRAFTS}


@pytest.fixture(scope="module")
def target(tmp_path_factory, gpt2_tokenizer_dir):
    """A tiny random GPT-2 whose greedy text wanders (initializer_range 0.2), and its transformers model."""
    model = make_hf_model()
    return model, save_checkpoint(model, tmp_path_factory.mktemp("target"), gpt2_tokenizer_dir)


def noisy_copy(model, noise: float):
    """``model`` with each weight moved by ``noise`` times its tensor's spread: a draft that often agrees."""
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * p.std() * noise)
    return draft


@pytest.fixture(scope="module")
def near_draft(target, tmp_path_factory):
    return save_checkpoint(noisy_copy(target[0], 0.05), tmp_path_factory.mktemp("near-draft"))


@pytest.fixture(scope="module")
def drafts(target, near_draft, tmp_path_factory):
    """The target itself (every greedy draft lands), a noisy copy (some do), and a draft of other widths and depth
    (almost none do)."""
    other = make_hf_model(n_embd=32, n_head=2, n_layer=1)
    return {"self": target[1], "near": near_draft, "other": save_checkpoint(other, tmp_path_factory.mktemp("other"))}


def assert_drafts_landed(stats, kind: str) -> None:
    """Drafts were fed; a near draft's landed sometimes, not always; the per-position counts add up and never
    grow with the position (a draft lands only after all those before it)."""
    assert stats.spec_decode_num_draft_tokens > 0
    if kind == "near":
        assert 0 < stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens
    per_pos = stats.spec_decode_num_accepted_tokens_per_pos
    assert len(per_pos) == NUM_DRAFTS and sum(per_pos) == stats.spec_decode_num_accepted_tokens
    assert list(per_pos) == sorted(per_pos, reverse=True)


# ---------------------------------------------------------------------------------------------- configuration
def test_the_model_key_makes_a_draft_model_config():
    config = SpeculativeConfig.parse({"model": "gpt2", "num_speculative_tokens": 3})
    assert (config.method, config.model, config.num_speculative_tokens) == ("draft_model", "gpt2", 3)
    for bad, words in [
        ({"method": "draft_model", "num_speculative_tokens": 3}, "needs model"),
        ({"method": "ngram", "model": "gpt2", "num_speculative_tokens": 3}, "takes no model"),
        ({"model": "gpt2", "num_speculative_tokens": 3, "prompt_lookup_max": 2}, "prompt_lookup_max"),
        ({"model": "", "num_speculative_tokens": 3}, "needs model"),
        ({"model": 7, "num_speculative_tokens": 3}, "needs model"),
        ({"model": "gpt2", "num_speculative_tokens": 3, "disable_by_batch_size": 0}, "disable_by_batch_size"),
    ]:
        with pytest.raises(ValueError, match=words):
            SpeculativeConfig.parse(bad)


def test_a_draft_that_cannot_serve_the_target_is_refused(target, tmp_path):
    for overrides, words in [({"vocab_size": 50000}, "vocabulary of 50000"), ({"n_positions": 64}, "64 positions")]:
        draft = save_checkpoint(make_hf_model(**overrides), tmp_path / str(overrides))
        with pytest.raises(ValueError, match=f"speculative_config: draft model .*{words}"):
            LLM(str(target[1]), speculative_config=spec_config(draft), **ENGINE)
    with pytest.raises(ValueError, match="speculative_config: draft model .* does not exist"):
        LLM(str(target[1]), speculative_config=spec_config(tmp_path / "missing"), **ENGINE)


# ---------------------------------------------------------------------------------------------- greedy parity
@pytest.mark.parametrize("kind", ["self", "near", "other"])
def test_greedy_outputs_are_those_without_speculation(target, drafts, kind):
    """Stop tokens and strings met inside accepted runs, n=2 forks, EOS."""
    plain = LLM(str(target[1]), **ENGINE)
    spec = LLM(str(target[1]), speculative_config=spec_config(drafts[kind]), **ENGINE)
    prompts = random_prompts(8)
    params = greedy_params(plain, prompts)
    for a, b in zip(spec.generate(prompts, params, use_tqdm=False), plain.generate(prompts, params, use_tqdm=False)):
        assert_same_completions(a, b)
    assert_drafts_landed(spec.llm_engine.get_stats(), kind)


def test_greedy_parity_through_preemption_and_the_prefix_cache(target, near_draft):
    """A pool too small for the batch (preemptions free both caches' blocks; drafts cut to the free blocks), then
    prompts that extend the first outputs, their blocks served by the prefix cache."""
    plain = LLM(str(target[1]), **ENGINE)
    spec = LLM(str(target[1]), speculative_config=spec_config(near_draft), num_blocks=24, **ENGINE)
    prompts = random_prompts(8)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, logprobs=0)
    first = spec.generate(prompts, params, use_tqdm=False)
    for a, b in zip(first, plain.generate(prompts, params, use_tqdm=False)):
        assert_same_completions(a, b)
    assert spec.llm_engine.get_stats().num_preemptions > 0
    longer = extended_latest_first(prompts, first)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0)
    hits = spec.llm_engine.get_stats().prefix_cache_hits
    for a, b in zip(spec.generate(longer, params, use_tqdm=False), plain.generate(longer, params, use_tqdm=False)):
        assert_same_completions(a, b)
    assert spec.llm_engine.get_stats().prefix_cache_hits > hits


def test_no_drafts_while_the_batch_is_at_disable_by_batch_size(target, drafts):
    """vLLM's ``disable_by_batch_size``: a step of that many running sequences or more feeds no drafts; once enough
    of them finish, the rest speculate again. Outputs are the plain ones throughout."""
    limit = 3
    config = {**spec_config(drafts["self"]), "disable_by_batch_size": limit}
    spec = LLM(str(target[1]), speculative_config=config, **ENGINE)
    steps = []  # (sequences running, rows with drafts) of each step
    execute = spec.llm_engine.runner.execute

    def noting(step):
        steps.append((len(step.seqs), sum(bool(seq.draft_token_ids) for seq in step.seqs)))
        return execute(step)

    spec.llm_engine.runner.execute = noting
    prompts = random_prompts(4)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (4, 6, 30, 30)]
    plain = LLM(str(target[1]), **ENGINE)
    for a, b in zip(spec.generate(prompts, params, use_tqdm=False), plain.generate(prompts, params, use_tqdm=False)):
        assert_same_completions(a, b)
    assert all(drafting == 0 for running, drafting in steps if running >= limit)
    assert any(drafting for running, drafting in steps if running < limit)


# ---------------------------------------------------------------------------------------------- the draft's cache
def reference_kv(model, tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's K and V ``[T, D]`` for ``tokens``, in float64, from transformers' hidden states."""
    model = model.double()
    with torch.no_grad():
        hidden = model(torch.tensor([tokens]), output_hidden_states=True).hidden_states
        width = model.config.n_embd
        kv = []
        for block, h in zip(model.transformer.h, hidden):  # hidden[l]: the input of block l
            qkv = block.attn.c_attn(block.ln_1(h))[0]
            kv.append((qkv[:, width : 2 * width], qkv[:, 2 * width :]))
    model.float()
    return kv


def assert_draft_cache_holds(engine: LLMEngine, draft_model, seq) -> None:
    cache = engine.proposer.runner.kv
    count = seq.draft_computed
    slots = torch.tensor([engine.blocks.slot(seq, p) for p in range(count)])
    for layer, (k, v) in enumerate(reference_kv(draft_model, seq.all_token_ids()[:count])):
        for pool, want in ((cache.k, k), (cache.v, v)):
            got = pool[layer].flatten(0, 1)[slots].flatten(1).double()
            assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_the_draft_cache_holds_each_sequences_tokens_after_every_step(target, near_draft):
    """A NaN-poisoned draft cache, checked after every step against transformers: prompts sharing prefixes (the
    draft catches up over blocks the prefix cache served), n=2 forks, and a pool small enough to preempt."""
    from transformers import GPT2LMHeadModel

    draft_model = GPT2LMHeadModel.from_pretrained(near_draft).eval()
    engine = LLMEngine(str(target[1]), speculative_config=spec_config(near_draft), num_blocks=40, **ENGINE)
    engine.proposer.runner.kv.k.fill_(float("nan"))
    engine.proposer.runner.kv.v.fill_(float("nan"))
    shared = [random.randrange(EOS) for _ in range(9)]
    for i, prompt in enumerate(random_prompts(6)):
        params = SamplingParams(max_tokens=random.randint(12, 30), temperature=0, ignore_eos=True, n=1 + i % 2)
        engine.add_request(str(i), shared + prompt if i % 3 else prompt, params)
    checked = 0
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            assert seq.draft_computed <= seq.num_computed
            if seq.draft_computed:
                assert_draft_cache_holds(engine, draft_model, seq)
                checked += 1
    stats = engine.get_stats()
    assert checked > 0 and stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert 0 < stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens


def test_prefix_cache_hits_serve_the_draft_the_blocks_it_filled(target, near_draft):
    """A prompt of whole blocks computed by the target alone (a one-token request never drafts), then asked again:
    the draft computes it all (the target only its last block, again: a hit never holds the last token). Then a
    prompt that extends that request's output: the blocks the prefix cache serves the target hold the draft's K/V
    too (the last block of the prompt included: the one computed again serves the hash), so the draft computes
    only the tokens after them (a few more than the target: the draft's last K/V of a step, and a step without
    drafts, are the target's alone). Its NaN-poisoned cache holds transformers' K/V for every token it claims; the
    outputs are the plain ones."""
    from transformers import GPT2LMHeadModel

    draft_model = GPT2LMHeadModel.from_pretrained(near_draft).eval()
    spec = LLM(str(target[1]), speculative_config=spec_config(near_draft), **ENGINE)
    engine = spec.llm_engine
    engine.proposer.runner.kv.k.fill_(float("nan"))
    engine.proposer.runner.kv.v.fill_(float("nan"))
    prompt = random_prompts(1)[0]
    prompt += [random.randrange(EOS) for _ in range(8 + -len(prompt) % ENGINE["block_size"])]
    spec.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)

    def admitted(prompt: list[int], params: SamplingParams) -> tuple[object, int]:
        """The request's sequence after its first step (admitted over the cached blocks, its prompt computed)."""
        engine.add_request(str(random.random()), prompt, params)
        engine.step()
        seq = engine.scheduler.running[0]
        assert seq.request.num_cached_tokens > 0
        return seq, seq.request.num_cached_tokens

    params = SamplingParams(max_tokens=random.randint(30, 40), temperature=0, ignore_eos=True)
    seq, _ = admitted(prompt, params)
    assert seq.draft_computed == 0
    outputs = [out for _ in iter(engine.has_unfinished_requests, False) for out in engine.step()]
    longer = prompt + outputs[-1].outputs[0].token_ids
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    seq, hits = admitted(longer, params)
    assert hits - (NUM_DRAFTS + 1) - ENGINE["block_size"] < seq.draft_computed <= hits
    assert_draft_cache_holds(engine, draft_model, seq)
    outputs = [out for _ in iter(engine.has_unfinished_requests, False) for out in engine.step()]
    plain = LLM(str(target[1]), **ENGINE).generate([longer], params, use_tqdm=False)
    assert outputs[-1].outputs[0].token_ids == plain[0].outputs[0].token_ids


@pytest.mark.parametrize("buckets", [False, True], ids=["eager", "buckets"])
def test_the_target_as_its_own_draft_accepts_every_draft(target, drafts, buckets):
    """The draft's cache, caught up in chunks and then a row at a time, agrees with the target's, so its greedy
    drafts are the target's tokens: all accepted, with n=2 forks and preemptions. With ``buckets`` its decode steps
    run in the padded fixed shapes that a GPU replays as CUDA graphs (here eagerly)."""
    from engine.cuda_graphs import StaticDecoder

    spec = LLM(str(target[1]), speculative_config=spec_config(drafts["self"]), max_num_seqs=8, num_blocks=48, **ENGINE)
    runner = spec.llm_engine.proposer.runner
    replayed = []
    if buckets:
        runner.static_decoder = StaticDecoder(runner.model, runner.kv, 8, spec.device, capture=False)
        decode = runner.static_decoder.decode
        runner.static_decoder.decode = lambda *args: replayed.append(len(args[0])) or decode(*args)
    plain = LLM(str(target[1]), **ENGINE)
    prompts = random_prompts(6)
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0, n=random.choice([1, 2]))
              for _ in prompts]  # fmt: skip
    for a, b in zip(spec.generate(prompts, params, use_tqdm=False), plain.generate(prompts, params, use_tqdm=False)):
        assert_same_completions(a, b)
    stats = spec.llm_engine.get_stats()
    assert stats.spec_decode_num_accepted_tokens == stats.spec_decode_num_draft_tokens > 0
    assert bool(replayed) == buckets


# ---------------------------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A target of 1000 tokens (the sampling tests draw thousands of times over the vocabulary), and its drafts."""
    target = make_hf_model(vocab_size=1000)
    other = make_hf_model(vocab_size=1000, n_embd=32, n_head=2, n_layer=1)
    paths = {name: save_checkpoint(model, tmp_path_factory.mktemp(name))
             for name, model in [("target", target), ("near", noisy_copy(target, 0.05)), ("other", other)]}  # fmt: skip
    return target, paths


@pytest.mark.parametrize("kind", ["near", "other"])
def test_sampled_outputs_follow_the_targets_distribution(small_vocab, kind):
    """3000 samples follow the target's distribution (:func:`assert_samples_follow`) whether the draft is close to
    it (some drafts accepted, the rejected positions drawn from the residual ``max(p - q, 0)``) or far from it (its
    top-2 tokens are not the target's: nearly every position drawn from the residual)."""
    target, paths = small_vocab
    spec = LLM(str(paths["target"]), speculative_config=spec_config(paths[kind]), max_num_seqs=256, **ENGINE)
    assert_samples_follow(spec, [random.randrange(1000) for _ in range(8)], target)
    assert_drafts_landed(spec.llm_engine.get_stats(), kind)


def test_rejection_sampling_lands_nearly_every_draft_of_a_draft_that_is_the_target(target, drafts):
    """Sampled at temperature 1 over the whole vocabulary with the target as its own draft, ``q`` is ``p`` up to
    rounding, so nearly every draft is accepted; checking each draft for equality with the target's own draw
    would accept it only as often as that draw picks it."""
    spec = LLM(str(target[1]), speculative_config=spec_config(drafts["self"]), **ENGINE)
    outs = spec.generate(random_prompts(16), SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True),
                         use_tqdm=False)  # fmt: skip
    stats = spec.llm_engine.get_stats()
    assert stats.spec_decode_num_accepted_tokens >= 0.95 * stats.spec_decode_num_draft_tokens > 0
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == len(outs), "sampling drew the same text twice"
