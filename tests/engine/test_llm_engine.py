"""``LLMEngine`` end to end on the torch backend: requests one at a time, preemption, chunked prefill, prefix
caching, shared-prompt n > 1, abort, stats. Every scenario checks its outputs against the same requests run alone on
a pool too large to preempt, and ends with every block free."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest

from engine import LLM, LLMEngine, SamplingParams
from tests.helpers import (
    assert_blocks_consistent,
    assert_engine_empty,
    assert_same_completions,
    make_hf_model,
    random_ids,
    save_checkpoint,
)

BLOCK = 16
MAX_REQUEST_BLOCKS = 16  # the stress test's largest request (blocks, all samples)
STOP_STRINGS = [["e"], [" t", "qz"], ["\n"], ["an", "in", "on"]]  # random text meets these now and then


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, gpt2_tokenizer_dir):
    """A tiny GPT-2 with GPT-2's full context (1024), so prompts of hundreds of tokens fit."""
    return save_checkpoint(make_hf_model(n_positions=1024), tmp_path_factory.mktemp("serving-gpt2"), gpt2_tokenizer_dir)


def engine(path, **kw) -> LLMEngine:
    return LLMEngine(str(path), backend="torch", dtype="float32", device="cpu", block_size=BLOCK, progress=False, **kw)


def random_params(max_tokens: int) -> SamplingParams:
    """Greedy or seeded sampling, n up to 4, stop strings, ignore_eos and logprobs, mixed at random."""
    greedy = random.random() < 0.4
    return SamplingParams(
        n=1 if greedy else random.randint(1, 4),
        max_tokens=max_tokens,
        temperature=0.0 if greedy else random.choice([0.7, 1.0]),
        top_k=random.choice([0, 50]),
        seed=None if greedy else random.randrange(1 << 30),
        stop=random.choice([None, *STOP_STRINGS]),
        ignore_eos=random.random() < 0.5,
        logprobs=random.choice([None, 0, 3]),
        prompt_logprobs=random.choice([None, None, 0, 2]),
    )


def run(eng: LLMEngine, max_steps: int = 100_000) -> dict:
    """Step until every request is done; the final output of each, by id."""
    final = {}
    for _ in range(max_steps):
        if not eng.has_unfinished_requests():
            break
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out
    assert not eng.has_unfinished_requests()
    return final


@pytest.fixture(scope="module")
def alone(checkpoint):
    """``alone(prompt, params)``: the request run by itself on a pool that never preempts, nothing cached."""
    llm = LLM(str(checkpoint), backend="torch", dtype="float32", device="cpu", block_size=BLOCK, progress=False,
              enable_prefix_caching=False)  # fmt: skip
    return lambda prompt, params: llm.generate(prompt, params, use_tqdm=False)[0]


def test_stress_preemption_chunking_and_prefix_caching_change_no_output(checkpoint, alone):
    """50 random requests on a pool a little larger than the largest one: all finish, each exactly as alone. Two long
    greedy completions, each needing 60% of the pool, start together first: preemption is certain."""
    requests = []
    for i in range(50):
        prompt = random_ids(random.randint(1, 200))
        params = random_params(random.randint(1, 24))
        if i < 8:  # the first eight together need more blocks than the pool holds
            prompt, params.n = random_ids(random.randint(150, 200)), 1
        elif i % 6 == 5:  # some share a prompt prefix with an earlier request
            prompt = requests[random.randrange(i)][1][: random.randint(1, 60)] + prompt[:40]
        if params.prompt_logprobs is not None and random.random() < 0.5:  # only the tail scored: prefix hits allowed
            params = dataclasses.replace(params, prompt_logprobs_start=random.randint(1, len(prompt)))
        per_sample = -(-(len(prompt) + params.max_tokens - 1) // BLOCK)
        params.n = min(params.n, MAX_REQUEST_BLOCKS // per_sample)  # keeps the pool, and the two long ones, small
        requests.append((f"req-{i}", prompt, params))
    num_blocks = MAX_REQUEST_BLOCKS + 2
    long = SamplingParams(max_tokens=-(-num_blocks * 6 // 10) * BLOCK - 8, temperature=0, ignore_eos=True)
    requests = [(f"long-{j}", random_ids(8), long) for j in range(2)] + requests
    eng = engine(checkpoint, num_blocks=num_blocks, max_num_seqs=16,
                 max_num_batched_tokens=random.choice([32, 64, 128]))  # fmt: skip
    pending = list(requests)
    final = {}
    eng.add_request(*pending.pop(0))  # the two long ones are admitted in the first step, then outgrow the pool
    eng.add_request(*pending.pop(0))
    while pending or eng.has_unfinished_requests():  # requests arrive while others run
        for _ in range(random.randint(0, 6)):
            if pending:
                eng.add_request(*pending.pop(0))
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out
    stats = eng.get_stats()
    assert stats.num_preemptions > 0
    assert stats.prompt_tokens == sum(len(p) for _, p, _ in requests)
    assert stats.generation_tokens >= sum(len(c.token_ids) for out in final.values() for c in out.outputs)
    assert_engine_empty(eng)
    assert sorted(final) == sorted(r[0] for r in requests)
    for request_id, prompt, params in requests:
        assert_same_completions(final[request_id], alone(prompt, params))


def test_chunked_prefill_matches_unchunked(checkpoint, alone):
    """A prompt of ~1000 tokens in chunks of 64 gives the tokens and log-probs (fp32, 1e-5) of one whole prefill."""
    prompt = random_ids(random.randint(960, 1000))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=5)
    chunked_engine = engine(checkpoint, max_num_batched_tokens=64, max_num_seqs=4)
    chunked_engine.add_request("long", prompt, params)
    steps = 0
    while chunked_engine.has_unfinished_requests():
        outputs = chunked_engine.step()
        steps += 1
        if steps < -(-len(prompt) // 64):
            assert outputs == []  # nothing is sampled before the last chunk
        else:
            final = outputs[0]
    assert steps == -(-len(prompt) // 64) + 7
    whole = alone(prompt, params)
    assert_same_completions(final, whole)


def test_prefix_cache_hits_and_eviction(checkpoint, alone):
    eng = engine(checkpoint, num_blocks=40)
    prompt = random_ids(random.randint(2 * BLOCK, 6 * BLOCK))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    eng.add_request("first", prompt, params)
    first = run(eng)["first"]
    eng.add_request("again", prompt, params)
    again = run(eng)["again"]
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == ((len(prompt) - 1) // BLOCK) * BLOCK
    assert_same_completions(again, first)
    # the same prefix, other suffixes: the whole blocks before the first difference are served from the cache
    cut = random.randint(BLOCK, len(prompt) - 1)
    for i in range(3):
        other = prompt[:cut] + random_ids(random.randint(1, 30))
        eng.add_request(f"suffix-{i}", other, params)
        out = run(eng)[f"suffix-{i}"]
        assert out.num_cached_tokens == min(cut // BLOCK, (len(other) - 1) // BLOCK) * BLOCK
        assert_same_completions(out, alone(other, params))
    # pressure: other prompts fill the pool and evict the cached blocks; the prompt computes again, correctly
    for i in range(4):
        eng.add_request(f"filler-{i}", random_ids(8 * BLOCK), SamplingParams(max_tokens=2 * BLOCK, ignore_eos=True))
    run(eng)
    eng.add_request("evicted", prompt, params)
    evicted = run(eng)["evicted"]
    assert evicted.num_cached_tokens < again.num_cached_tokens
    assert_same_completions(evicted, first)
    assert_engine_empty(eng)


def test_cache_salt_keeps_prefix_caches_apart(checkpoint):
    """vLLM's ``cache_salt`` in a prompt dict: only requests of the same salt (or both without one) hit each other's
    blocks; the tokens are the same either way."""
    eng = engine(checkpoint)
    prompt = random_ids(random.randint(2 * BLOCK, 6 * BLOCK))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    full = (len(prompt) - 1) // BLOCK * BLOCK
    salts = [None, "tenant-a", "tenant-a", "tenant-b", None, f"{random.random()}"]
    outs = []
    for i, salt in enumerate(salts):
        eng.add_request(str(i), prompt if salt is None else {"prompt_token_ids": prompt, "cache_salt": salt}, params)
        outs.append(run(eng)[str(i)])
    assert [out.num_cached_tokens for out in outs] == [0, 0, full, 0, full, 0]
    assert len({tuple(out.outputs[0].token_ids) for out in outs}) == 1
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        eng.add_request("empty", {"prompt_token_ids": prompt, "cache_salt": ""}, params)
    with pytest.raises(ValueError, match="cache_salt applies to generation requests"):
        eng.token_ids({"prompt_token_ids": prompt, "cache_salt": "tenant-a"})
    assert_engine_empty(eng)


def test_reset_prefix_cache_waits_for_the_engine_to_be_empty(checkpoint):
    """vLLM's ``reset_prefix_cache``: refused while a request runs (its cache intact), then every prompt computes
    afresh, to the same tokens."""
    eng = engine(checkpoint)
    prompt = random_ids(random.randint(2 * BLOCK, 6 * BLOCK))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    eng.add_request("first", prompt, params)
    first = run(eng)["first"]
    eng.add_request("running", prompt, params)
    eng.step()
    assert not eng.reset_prefix_cache()
    assert run(eng)["running"].num_cached_tokens == ((len(prompt) - 1) // BLOCK) * BLOCK
    assert eng.reset_prefix_cache()
    eng.add_request("cold", prompt, params)
    cold = run(eng)["cold"]
    assert cold.num_cached_tokens == 0
    assert_same_completions(cold, first)
    assert_engine_empty(eng)


def test_requests_admitted_in_one_step_share_a_prefix_computed_in_that_step(checkpoint, alone):
    """The first request's full blocks are registered when its step is scheduled, so the others admitted in the same
    step reuse them (each layer stores the step's K/V before attention reads the cache)."""
    eng = engine(checkpoint)
    prefix = random_ids(4 * BLOCK + random.randint(0, BLOCK - 1))
    prompts = [prefix + random_ids(random.randint(1, 20)) for _ in range(4)]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=1)
    for i, prompt in enumerate(prompts):
        eng.add_request(f"q{i}", prompt, params)
    assert len(eng.step()) == 4  # one step computed all four prompts (the budget holds them)
    final = run(eng)
    shared = (len(prefix) // BLOCK) * BLOCK
    assert [final[f"q{i}"].num_cached_tokens for i in range(4)] == [0, shared, shared, shared]
    for i, prompt in enumerate(prompts):
        assert_same_completions(final[f"q{i}"], alone(prompt, params))
    assert_engine_empty(eng)


def test_n_samples_share_the_prompt_and_equal_separate_seeded_requests(checkpoint, alone):
    eng = engine(checkpoint, num_blocks=64, enable_prefix_caching=False)  # sharing comes from the fork alone
    prompt = random_ids(random.randint(3 * BLOCK + 1, 5 * BLOCK - 1))  # ends in a partly filled block
    n, seed = 4, random.randrange(1 << 30)
    params = SamplingParams(n=n, max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True, logprobs=1)
    eng.add_request("n", prompt, params)
    used = []
    while eng.has_unfinished_requests():
        outputs = eng.step()
        used.append(eng.blocks.num_blocks - eng.blocks.num_free)
        if outputs:
            assert len(outputs[0].outputs) == n
            final = outputs[0]
    separate = n * eng.blocks.blocks_needed(len(prompt) + 11)
    assert max(used) < separate  # the prompt's full blocks are held once
    assert eng.get_stats().prompt_tokens == len(prompt)  # and computed once
    for j, completion in enumerate(final.outputs):
        single = alone(prompt, SamplingParams(max_tokens=12, seed=seed + j, ignore_eos=True, logprobs=1))
        assert completion.index == j
        assert completion.token_ids == single.outputs[0].token_ids
    assert len({tuple(c.token_ids) for c in final.outputs}) > 1
    assert_engine_empty(eng)


def test_abort_waiting_running_and_preempted_requests(checkpoint):
    eng = engine(checkpoint, num_blocks=12, max_num_seqs=4, max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    for i in range(6):
        eng.add_request(f"r{i}", random_ids(random.randint(20, 60)), params)
    preempted = None
    for _ in range(200):
        eng.step()
        waiting = [s.request.request_id for s in eng.scheduler.waiting]
        preempted = next((s.request.request_id for s in eng.scheduler.waiting if s.output_token_ids), None)
        if preempted and eng.scheduler.running and len(waiting) > 1:
            break
    assert preempted is not None, "no request was preempted"
    running = eng.scheduler.running[0].request.request_id
    never_started = next(r for r in waiting if r != preempted)
    eng.abort_request([preempted, running, never_started, "no-such-request"])
    assert not {preempted, running, never_started} & set(eng.requests)
    live = [s for r in eng.requests.values() for s in r.seqs if s.block_table]
    assert_blocks_consistent(eng.blocks, live)
    eng.abort_request("no-such-request")  # unknown ids are a no-op
    eng.add_request("after", random_ids(5), SamplingParams(max_tokens=3))
    final = run(eng)
    assert "after" in final and not {preempted, running, never_started} & set(final)
    assert_engine_empty(eng)


def test_an_abandoned_stream_frees_its_blocks_and_the_engine_keeps_serving(checkpoint):
    llm = LLM(str(checkpoint), backend="torch", dtype="float32", device="cpu", block_size=BLOCK, progress=False)
    stream = llm.generate_stream([random_ids(40), random_ids(7)], SamplingParams(max_tokens=30, n=2, seed=1))
    next(stream)
    stream.close()
    assert_engine_empty(llm.llm_engine)
    out = llm.generate(random_ids(9), SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_stream_with_stop_strings_never_shows_what_the_output_drops(checkpoint):
    llm = LLM(str(checkpoint), backend="torch", dtype="float32", device="cpu", block_size=BLOCK, progress=False)
    prompt = random_ids(5)
    free = llm.generate(prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), use_tqdm=False)
    text = free[0].outputs[0].text
    start = random.randrange(len(text) // 2, len(text) - 3)
    stop = text[start : start + 3]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop, "\x00never"])
    final = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    shown = ""
    for delta in llm.generate_stream(prompt, params):
        shown += delta.text
        assert final.text.startswith(shown)  # nothing shown is later taken back
    assert shown == final.text == text[: text.find(stop)]


def test_step_outputs_metrics_and_stats(checkpoint):
    eng = engine(checkpoint, max_num_batched_tokens=32, max_num_seqs=4)
    before = time.time()
    eng.add_request("a", random_ids(50), SamplingParams(max_tokens=3, ignore_eos=True))
    out = eng.step()
    assert out == []  # the first chunk of 32 of 50 prompt tokens: no token yet
    stats = eng.get_stats()
    assert (stats.num_running, stats.num_waiting, stats.prompt_tokens, stats.generation_tokens) == (1, 0, 50, 0)
    assert 0 < stats.kv_cache_usage <= 1
    eng.add_request("b", random_ids(3), SamplingParams(max_tokens=1))  # added between steps
    outs = eng.step()
    assert [o.request_id for o in outs] == ["a", "b"]
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 1] and [o.finished for o in outs] == [False, True]
    final = run(eng)
    m = final["a"].metrics
    assert before <= m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time <= time.time()
    assert eng.get_stats().generation_tokens == 4
    assert_engine_empty(eng)


def test_a_batchs_sampling_parameters_are_kept_while_its_sequences_are_the_same(checkpoint):
    """The engine reads a batch's sampling parameters once per composition: the same sequences in the same order
    give the same ``SamplingBatch``; another order, a sequence replaced or one fewer give a new one, read from the
    sequences' own parameters."""
    eng = engine(checkpoint, max_num_seqs=4)
    temperatures = random.sample([0.3, 0.5, 0.7, 0.9, 1.1], 4)
    for i, t in enumerate(temperatures):
        eng.add_request(str(i), random_ids(5), SamplingParams(max_tokens=4, temperature=t, top_p=0.9))
    eng.step()
    seqs = list(eng.scheduler.running)
    V = eng.config.vocab_size
    batch = eng._sampling_batch(seqs, V)
    assert eng._sampling_batch(list(seqs), V) is batch
    assert batch.temperatures.tolist() == pytest.approx([seq.params.temperature for seq in seqs])
    other = eng.make_request("x", random_ids(3), SamplingParams(temperature=0.0))
    for changed in (seqs[::-1], seqs[:3], seqs[:3] + other.seqs):
        new = eng._sampling_batch(changed, V)
        assert new is not batch
        want = [seq.params.temperature or 1.0 for seq in changed]  # greedy rows divide by 1
        assert new.temperatures.tolist() == pytest.approx(want)
        batch = new


def test_llm_is_a_front_over_the_engine(checkpoint):
    llm = LLM(str(checkpoint), backend="torch", dtype="float32", device="cpu", block_size=BLOCK, progress=False)
    assert isinstance(llm.llm_engine, LLMEngine)
    llm.llm_engine.add_request("mine", random_ids(4), SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="already generating"):
        llm.generate(random_ids(3))
    run(llm.llm_engine)
    outs = llm.generate([random_ids(3), random_ids(4)], SamplingParams(max_tokens=2), use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [1, 1] and all(o.finished for o in outs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_num_batched_tokens=4, max_num_seqs=8), "max_num_batched_tokens"),
        (dict(enable_prefix_caching="yes"), "enable_prefix_caching"),
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
    ],
)
def test_bad_engine_arguments(checkpoint, kwargs, match):
    with pytest.raises(ValueError, match=match):
        engine(checkpoint, **kwargs)


def test_bad_requests_are_refused_and_leave_nothing_behind(checkpoint):
    eng = engine(checkpoint, num_blocks=8, max_num_seqs=2)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)
    assert SamplingParams(logprobs=20).logprobs == 20
    with pytest.raises(ValueError, match="max_num_seqs"):
        eng.add_request("n", random_ids(3), SamplingParams(n=3, max_tokens=2))
    with pytest.raises(ValueError, match="KV blocks"):
        eng.add_request("big", random_ids(100), SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="request_id"):
        eng.add_request(7, random_ids(3))
    eng.add_request("dup", random_ids(3))
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("dup", random_ids(3))
    assert list(eng.requests) == ["dup"] and eng.get_stats().prompt_tokens == 3
    run(eng)
    eng.add_request("dup", random_ids(3))  # a finished request's id may be used again
    run(eng)
    assert_engine_empty(eng)


def test_stop_strings_need_a_tokenizer(checkpoint, tmp_path):
    """Token-id prompts run without a tokenizer (ids only); stop strings then cannot be checked."""
    import shutil

    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, tmp_path / name)
    eng = LLMEngine(str(tmp_path), backend="torch", device="cpu", progress=False, tokenizer=tmp_path / "none")
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        eng.add_request("s", random_ids(3), SamplingParams(stop="x"))
    eng.add_request("ids", random_ids(3), SamplingParams(max_tokens=2, ignore_eos=True))
    out = run(eng)["ids"].outputs[0]
    assert len(out.token_ids) == 2 and out.text == ""
