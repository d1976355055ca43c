"""``gpt2-triton serve`` through the official ``openai`` client (sync and async) and raw HTTP: OpenAI's shapes, the
same outputs as ``LLM.generate``, streaming, concurrency, disconnects, every error case, metrics."""

from __future__ import annotations

import asyncio
import json
import random
import time

import openai
import pytest

from engine import LLM, BeamSearchParams, SamplingParams
from engine.beam_search import generated
from tests.server.conftest import start_server


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """The offline API on the same checkpoint: what the server must answer."""
    return LLM(str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu", block_size=16, progress=False)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def words() -> str:
    return " ".join(random.choice(["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran"])
                    for _ in range(random.randint(2, 12)))  # fmt: skip


def expected(reference, prompt, **params) -> list[str]:
    return [c.text for c in reference.generate(prompt, SamplingParams(**params), use_tqdm=False)[0].outputs]


def test_completion_equals_llm_generate_greedy_and_seeded(client, server, reference):
    prompt = words()
    out = client.completions.create(model=server.model, prompt=prompt, max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.model == server.model and out.id.startswith("cmpl-")
    assert [c.text for c in out.choices] == expected(reference, prompt, max_tokens=12, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and out.choices[0].index == 0
    n_prompt = len(reference.get_tokenizer().encode(prompt))
    assert out.usage.prompt_tokens == n_prompt
    assert out.usage.total_tokens == n_prompt + out.usage.completion_tokens
    seed = random.randrange(1 << 30)
    out = client.completions.create(model=server.model, prompt=prompt, max_tokens=10, seed=seed, n=3, top_p=0.9,
                                    extra_body={"top_k": 40, "min_p": 0.05, "ignore_eos": True})  # fmt: skip
    want = expected(reference, prompt, max_tokens=10, seed=seed, n=3, top_p=0.9, top_k=40, min_p=0.05, ignore_eos=True)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == want


def test_beam_search_equals_llm_beam_search(client, server, reference):
    prompts, width, max_tokens = [words(), words()], random.randint(2, 4), random.randint(3, 8)
    out = client.completions.create(model=server.model, prompt=prompts, max_tokens=max_tokens, n=width, echo=True,
                                    extra_body={"use_beam_search": True, "length_penalty": 0.5})  # fmt: skip
    want = reference.beam_search(prompts, BeamSearchParams(width, max_tokens, length_penalty=0.5), use_tqdm=False)
    tok = reference.get_tokenizer()
    expected, completion_tokens = [], 0
    for prompt, beams in zip(prompts, want):
        for seq in beams.sequences:
            tokens, text = generated(seq, len(tok.encode(prompt)), tok)
            expected.append((prompt + text, seq.finish_reason))
            completion_tokens += len(tokens)
    assert [(c.text, c.finish_reason) for c in sorted(out.choices, key=lambda c: c.index)] == expected
    assert out.usage.completion_tokens == completion_tokens


def test_stream_concatenates_to_the_full_text(client, server):
    prompt = words()
    full = client.completions.create(model=server.model, prompt=prompt, max_tokens=16, temperature=0, n=2)
    stream = client.completions.create(model=server.model, prompt=prompt, max_tokens=16, temperature=0, n=2,
                                       stream=True, stream_options={"include_usage": True})  # fmt: skip
    texts, finish, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        assert chunk.object == "text_completion"
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
            continue
        for c in chunk.choices:
            assert c.index not in finish  # nothing after a choice's finish_reason
            texts[c.index] += c.text
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in full.choices}
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert usage == full.usage


def test_stream_of_several_prompts_and_samples_adds_up_to_the_answer(client, server):
    """Two prompts, n=3 seeded samples, stop strings and logprobs: each choice's streamed chunks (the engine's deltas)
    add up to the non-streamed answer: text, tokens, logprobs, running text offsets, finish reason; and the usage
    chunk counts what the answer does."""
    prompts = [words(), words()]
    body = dict(model=server.model, prompt=prompts, max_tokens=12, n=3, seed=random.randrange(1 << 30), logprobs=1,
                stop=[random.choice(["e", "a", " t"])], extra_body={"top_k": 30})  # fmt: skip
    full = client.completions.create(**body)
    stream = client.completions.create(**body, stream=True, stream_options={"include_usage": True})
    streamed, usage = {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            continue
        for c in chunk.choices:
            s = streamed.setdefault(c.index, {"text": "", "tokens": [], "token_logprobs": [], "text_offset": []})
            assert "finish_reason" not in s  # nothing after a choice's finish_reason
            s["text"] += c.text
            for key in ("tokens", "token_logprobs", "text_offset"):
                s[key] += getattr(c.logprobs, key)
            if c.finish_reason is not None:
                s["finish_reason"] = c.finish_reason
    assert sorted(streamed) == list(range(6))
    for c in full.choices:
        s = streamed[c.index]
        assert (s["text"], s["finish_reason"]) == (c.text, c.finish_reason)
        assert (s["tokens"], s["text_offset"]) == (c.logprobs.tokens, c.logprobs.text_offset)
        assert s["token_logprobs"] == pytest.approx(c.logprobs.token_logprobs, rel=1e-5)
    assert usage == full.usage


def test_async_client_64_concurrent_streams(server, reference):
    """64 streaming requests at once all complete, each with its own right text."""
    prompts = [words() for _ in range(64)]
    lengths = [random.randint(1, 12) for _ in prompts]
    want = [c.outputs[0].text for c in reference.generate(
        prompts, [SamplingParams(max_tokens=n, temperature=0) for n in lengths], use_tqdm=False)]  # fmt: skip

    async def one(client, prompt, n):
        text = ""
        stream = await client.completions.create(model=server.model, prompt=prompt, max_tokens=n, temperature=0,
                                                  stream=True)  # fmt: skip
        async for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
        return text

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths))), 300)

    assert asyncio.run(run()) == want


def test_logprobs_echo_stop_token_ids_and_token_prompts(client, server, reference):
    tok = reference.get_tokenizer()
    prompt_ids = tok.encode(words())
    out = client.completions.create(model=server.model, prompt=prompt_ids, max_tokens=6, temperature=0, logprobs=3)
    ref = reference.generate(prompt_ids, SamplingParams(max_tokens=6, temperature=0, logprobs=3), use_tqdm=False)[0]
    c, r = out.choices[0], ref.outputs[0]
    assert c.text == r.text
    lp = c.logprobs
    assert lp.tokens == [tok.token_bytes(t).decode("utf-8", errors="replace") for t in r.token_ids]
    assert lp.token_logprobs == pytest.approx([d[t] for d, t in zip(r.logprobs, r.token_ids)], rel=1e-5)
    assert all(len(top) <= 4 and max(top.values()) <= 0 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # echo: the prompt's text first; several prompts give prompt-major choices
    texts = [words(), words()]
    out = client.completions.create(model=server.model, prompt=texts, max_tokens=4, temperature=0, echo=True, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for c in out.choices:
        assert c.text.startswith(texts[c.index // 2])
    # stop strings and stop_token_ids (a vLLM extra)
    free = reference.generate(prompt_ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0]  # fmt: skip
    stop_id = free.token_ids[random.randrange(1, 12)]
    out = client.completions.create(model=server.model, prompt=prompt_ids, max_tokens=12, temperature=0,
                                    extra_body={"stop_token_ids": [stop_id], "ignore_eos": True})  # fmt: skip
    assert out.choices[0].finish_reason == "stop"
    stop = free.text[len(free.text) // 2 :][:2]
    out = client.completions.create(model=server.model, prompt=prompt_ids, max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})  # fmt: skip
    assert out.choices[0].text == free.text[: free.text.find(stop)]


def test_echo_with_logprobs_scores_the_prompt(client, server, reference):
    """``echo`` + ``logprobs`` (how lm-eval's completions backend scores text): the logprobs cover the prompt's tokens
    (``null`` for the first) then the completion's, streamed or not, and equal the offline prompt logprobs."""
    tok = reference.get_tokenizer()
    prompt = words()
    ids = tok.encode(prompt)
    k = random.randint(0, 3)
    ref = reference.generate(prompt, SamplingParams(max_tokens=3, temperature=0, logprobs=k, prompt_logprobs=k),
                             use_tqdm=False)[0]  # fmt: skip
    out = client.completions.create(model=server.model, prompt=prompt, max_tokens=3, temperature=0, logprobs=k,
                                    echo=True)  # fmt: skip
    lp = out.choices[0].logprobs
    every = ids + ref.outputs[0].token_ids
    assert out.choices[0].text == prompt + ref.outputs[0].text
    assert lp.tokens == [tok.token_bytes(t).decode("utf-8", errors="replace") for t in every]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [d[t] for d, t in zip(ref.prompt_logprobs[1:] + ref.outputs[0].logprobs, every[1:])]
    assert lp.token_logprobs[1:] == pytest.approx(want, rel=1e-5)
    assert all(len(top) in (k, k + 1) for top in lp.top_logprobs[1:])
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(every))]
    stream = client.completions.create(model=server.model, prompt=prompt, max_tokens=3, temperature=0, logprobs=k,
                                       echo=True, stream=True)  # fmt: skip
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in stream:
        for c in chunk.choices:
            for key in streamed:
                streamed[key] += getattr(c.logprobs, key)
    assert streamed["tokens"] == lp.tokens and streamed["text_offset"] == lp.text_offset
    assert streamed["token_logprobs"][1:] == pytest.approx(lp.token_logprobs[1:], rel=1e-5)


def test_penalties_and_logit_bias(client, server, reference):
    prompt = words()
    favourite = reference.get_tokenizer().encode(" banana")[0]
    out = client.completions.create(model=server.model, prompt=prompt, max_tokens=5, temperature=0,
                                    logit_bias={str(favourite): 100})  # fmt: skip
    assert out.choices[0].text == " banana" * 5
    params = dict(max_tokens=12, temperature=0, presence_penalty=1.5, frequency_penalty=0.5, ignore_eos=True)
    out = client.completions.create(model=server.model, prompt=prompt, max_tokens=12, temperature=0,
                                    presence_penalty=1.5, frequency_penalty=0.5,
                                    extra_body={"ignore_eos": True, "repetition_penalty": 1.2})  # fmt: skip
    assert out.choices[0].text == expected(reference, prompt, repetition_penalty=1.2, **params)[0]
    out = client.completions.create(model=server.model, prompt=prompt, max_tokens=8, temperature=0,
                                    logit_bias={str(reference.config.eos_token_id): 100},
                                    extra_body={"min_tokens": 3})  # fmt: skip
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 4  # 3, then EOS


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "hi", "temperature": -0.5}, "temperature"),
        ({"prompt": "hi", "logprobs": 6}, "logprobs"),
        ({"prompt": "hi", "n": "many"}, "n"),
        ({"prompt": "hi", "frobnicate": 1}, "frobnicate"),
        ({"prompt": [], "max_tokens": 2}, "prompt"),
        ({"prompt": "hi", "suffix": "bye"}, "suffix"),
        ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": [99999999]}, "prompt"),
        ({"prompt": "hi " * 200, "max_tokens": 16}, "prompt"),
        ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
        ({"prompt": "hi", "use_beam_search": True, "n": 0}, "n"),
        ({"prompt": "hi", "use_beam_search": True, "stream": True}, "stream"),
        ({"prompt": "hi", "use_beam_search": True, "logprobs": 2}, "logprobs"),
        ({"prompt": "hi", "use_beam_search": True, "stop": "x"}, "stop"),
        ({"prompt": "hi", "use_beam_search": True, "length_penalty": "long"}, "length_penalty"),
        ({"prompt": "hi", "min_p": 1.5}, "min_p"),
        ({"prompt": "hi", "priority": 1}, "priority"),
        ({"prompt": "hi", "bad_words": ["ok", ""]}, "bad_words"),
    ],
)
def test_invalid_fields_are_400_naming_them(server, body, param):
    r = server.post("/v1/completions", json={"model": server.model, **body})
    err = error_of(r, 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert server.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200


def test_other_errors(server):
    assert error_of(
        server.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    assert error_of(server.post("/v1/completions", json={"model": "gpt-4", "prompt": "hi"}), 404)["param"] == "model"
    assert error_of(server.post("/v1/completions", content=b"x" * (2 << 20)), 413)
    assert error_of(server.get("/v1/nothing-here"), 404)
    err = error_of(server.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}), 400)
    assert "/v1/completions" in err["message"]
    assert server.post("/v1/completions", json={"prompt": "still fine", "max_tokens": 2}).status_code == 200


def test_models_health_version_tokenize(server, reference):
    models = server.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [server.model]
    assert server.get("/health").status_code == 200 and "version" in server.get("/version").json()
    text = words()
    tokens = server.post("/tokenize", json={"prompt": text}).json()
    assert tokens["tokens"] == reference.get_tokenizer().encode(text) and tokens["count"] == len(tokens["tokens"])
    assert server.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": text}
    assert error_of(server.post("/detokenize", json={"tokens": [-1]}), 400)["param"] == "tokens"


def metric(server, name: str) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(f"gpt2_triton:{name} ") or line.startswith(f"gpt2_triton:{name}{{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def test_truncate_prompt_tokens_echoes_what_the_model_read(client, server, reference):
    prompt = " ".join(words() for _ in range(30))
    ids = reference.get_tokenizer().encode(prompt)
    k = random.randint(2, min(len(ids) - 1, 40))
    out = client.completions.create(model=server.model, prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                    extra_body={"truncate_prompt_tokens": k})  # fmt: skip
    cut = reference.get_tokenizer().decode(ids[-k:])
    assert out.choices[0].text == cut + expected(reference, ids[-k:], max_tokens=4, temperature=0)[0]
    assert out.usage.prompt_tokens == k
    r = server.post("/v1/completions", json={"model": server.model, "prompt": "hi", "truncate_prompt_tokens": 0})
    assert error_of(r, 400)["param"] == "truncate_prompt_tokens"


def test_allowed_token_ids_include_stop_str_in_output_and_bad_words(client, server, reference):
    prompt, allowed = words(), random.sample(range(50256), 4)
    out = client.completions.create(model=server.model, prompt=prompt, max_tokens=6, logprobs=2,
                                    extra_body={"allowed_token_ids": allowed, "ignore_eos": True})  # fmt: skip
    pieces = {reference.get_tokenizer().decode([a]) for a in allowed}
    assert len(out.choices[0].logprobs.tokens) == 6 and set(out.choices[0].logprobs.tokens) <= pieces
    full = expected(reference, prompt, max_tokens=12, temperature=0, ignore_eos=True)[0]
    stop = full[len(full) // 2 :][:2]
    out = client.completions.create(model=server.model, prompt=prompt, max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"include_stop_str_in_output": True, "ignore_eos": True})  # fmt: skip
    assert out.choices[0].text == full[: full.index(stop) + len(stop)]
    first = reference.get_tokenizer().decode(reference.get_tokenizer().encode(full)[:1])
    out = client.completions.create(model=server.model, prompt=prompt, max_tokens=1, temperature=0,
                                    extra_body={"bad_words": [first.strip() or first]})  # fmt: skip
    assert out.choices[0].text != first


def test_skip_special_tokens(client, server):
    """vLLM's ``skip_special_tokens``: ``<|endoftext|>`` inside an output (``ignore_eos``) adds no text by default."""
    body = dict(model=server.model, prompt=words(), max_tokens=3, temperature=0, logit_bias={"50256": 100})
    out = client.completions.create(**body, extra_body={"ignore_eos": True})
    assert out.choices[0].text == "" and out.usage.completion_tokens == 3
    out = client.completions.create(**body, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert out.choices[0].text == "<|endoftext|>" * 3


def test_cache_salt(client, server, reference):
    """vLLM's ``cache_salt``: the same completion (its prefix cache apart); an empty one, or one with beam search,
    is a 400 naming it."""
    prompt = words()
    out = client.completions.create(model=server.model, prompt=prompt, max_tokens=6, temperature=0,
                                    extra_body={"cache_salt": f"tenant-{random.randrange(100)}"})  # fmt: skip
    assert out.choices[0].text == expected(reference, prompt, max_tokens=6, temperature=0)[0]
    for extra in ({"cache_salt": ""}, {"cache_salt": "a", "use_beam_search": True}):
        r = server.post("/v1/completions", json={"model": server.model, "prompt": prompt, "max_tokens": 2, **extra})
        assert error_of(r, 400)["param"] == "cache_salt"


def test_structured_outputs_every_way_a_client_asks(client, server):
    """OpenAI's response_format (json_schema, json_object), vLLM's structured_outputs and guided_* fields."""
    import re

    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
    out = client.completions.create(model=server.model, prompt=words(), max_tokens=20, n=2,
                                    extra_body={"response_format": {"type": "json_schema",
                                                "json_schema": {"name": "a", "schema": schema}}})  # fmt: skip
    assert all(json.loads(c.text)["answer"] in ("yes", "no") for c in out.choices)
    choices = ["red", "green", "blue"]
    out = client.completions.create(
        model=server.model, prompt=words(), max_tokens=8, extra_body={"guided_choice": choices}
    )
    assert out.choices[0].text in choices and out.choices[0].finish_reason == "stop"
    body = {"model": server.model, "prompt": words(), "max_tokens": 12, "structured_outputs": {"regex": "[a-c]{3}x"}}
    assert re.fullmatch("[a-c]{3}x", server.post("/v1/completions", json=body).json()["choices"][0]["text"])
    stream = server.post("/v1/completions", json={**body, "stream": True}).text
    chunks = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
    assert re.fullmatch("[a-c]{3}x", "".join(c["choices"][0]["text"] for c in chunks))


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs"),
        ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"use_beam_search": True, "n": 2, "guided_choice": ["a", "b"]}, "guided_choice"),
    ],
)
def test_structured_outputs_mistakes_are_400_naming_the_field(server, extra, param):
    r = server.post("/v1/completions", json={"model": server.model, "prompt": "hi", "max_tokens": 4, **extra})
    assert error_of(r, 400)["param"] == param


@pytest.mark.parametrize("drafter", ["ngram", "draft_model"])
def test_a_speculating_server_answers_what_the_engine_without_speculation_does(tiny_checkpoint, reference, drafter):
    """``serve --speculative-config`` (and ``--scheduling-policy priority``, requests with a priority): greedy
    completions, whole and streamed, are the reference's, and ``/metrics`` counts the drafts (prompts of repeated
    words: the lookups hit; or the model itself drafts)."""
    spec = {"num_speculative_tokens": 3, "prompt_lookup_max": 2}
    if drafter == "draft_model":
        spec = {"num_speculative_tokens": 3, "model": str(tiny_checkpoint)}
    options = {"speculative_config": spec, "scheduling_policy": "priority"}
    live, stop = start_server(tiny_checkpoint, engine_args=options)
    try:
        prompts = [words() + " " + words() for _ in range(3)]
        body = {"model": live.model, "prompt": prompts, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
                "priority": random.randint(-3, 3)}  # fmt: skip
        want = [expected(reference, p, max_tokens=16, temperature=0, ignore_eos=True)[0] for p in prompts]
        choices = sorted(live.post("/v1/completions", json=body).json()["choices"], key=lambda c: c["index"])
        assert [c["text"] for c in choices] == want
        stream = live.post("/v1/completions", json={**body, "prompt": prompts[0], "stream": True}).text
        chunks = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == want[0]
        assert metric(live, "spec_decode_num_draft_tokens_total") > 0
        assert metric(live, "spec_decode_num_drafts_total") <= metric(live, "spec_decode_num_draft_tokens_total")
        assert metric(live, "spec_decode_num_accepted_tokens_total") >= 0
        text = live.get("/metrics").text
        per_pos = [f'gpt2_triton:spec_decode_num_accepted_tokens_per_pos_total{{position="{j}"}}' for j in range(3)]
        assert all(name in text for name in per_pos)
    finally:
        stop()


def wait_until_idle(server, why: str = "the engine did not go idle") -> None:
    """Until no request runs or waits and the KV pool is empty (20 s at most, else fail with ``why``)."""
    deadline = time.monotonic() + 20
    busy = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    while any(metric(server, name) for name in busy):
        assert time.monotonic() < deadline, why
        time.sleep(0.05)


def test_usage_counts_cached_prompt_tokens_until_the_prefix_cache_is_reset(client, server, reference):
    """A prompt asked again has its whole blocks served by the prefix cache: OpenAI's
    ``usage.prompt_tokens_details.cached_tokens`` says how many; after ``POST /reset_prefix_cache`` none are. While
    a request runs the reset is refused (409) and forgets nothing."""
    prompt = " ".join(words() for _ in range(8))
    whole_blocks = (len(reference.get_tokenizer().encode(prompt)) - 1) // 16 * 16  # the server's block_size

    def cached_tokens(**extra) -> int:
        out = client.completions.create(model=server.model, prompt=prompt, max_tokens=2, **extra)
        return out.usage.prompt_tokens_details.cached_tokens

    wait_until_idle(server)
    assert server.post("/reset_prefix_cache").status_code == 200
    assert whole_blocks > 0 and cached_tokens() == 0
    assert cached_tokens(n=2) == whole_blocks
    stream = client.completions.create(model=server.model, prompt=prompt, max_tokens=2, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    (usage,) = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert usage.prompt_tokens_details.cached_tokens == whole_blocks
    assert server.post("/reset_prefix_cache").status_code == 200
    assert cached_tokens() == 0
    # 32 sequences of 100 tokens: about a second of work, against the milliseconds the reset takes to arrive
    body = {"model": server.model, "prompt": [words() for _ in range(16)], "n": 2, "max_tokens": 100, "stream": True,
            "ignore_eos": True}  # fmt: skip
    conn, r = server.send("POST", "/v1/completions", json=body)
    try:
        assert r.status == 200 and r.readline().startswith(b"data: ")  # running
        assert error_of(server.post("/reset_prefix_cache"), 409)["type"] == "conflict_error"
    finally:
        conn.sock.shutdown(2)
        conn.close()
    wait_until_idle(server)
    assert cached_tokens() == whole_blocks


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    short = {"model": server.model, "prompt": words(), "max_tokens": 2, "ignore_eos": True}
    assert server.post("/v1/completions", json=short).status_code == 200  # one success by "length" for the counter
    body = {"model": server.model, "prompt": words(), "max_tokens": 100, "stream": True, "ignore_eos": True}
    conn, r = server.send("POST", "/v1/completions", json=body)
    assert r.status == 200 and r.readline().startswith(b"data: ")  # the first token arrived
    conn.sock.shutdown(2)  # the client goes away mid-stream
    conn.close()
    wait_until_idle(server, "the disconnected request was not aborted")
    assert metric(server, "generation_tokens_total") > 0 and metric(server, "prompt_tokens_total") > 0
    text = server.get("/metrics").text
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert f"gpt2_triton:{name}_bucket" in text
    assert 'gpt2_triton:request_success_total{finished_reason="length"}' in text


def test_metrics_name_the_kv_cache_s_configuration(server):
    """vLLM's ``cache_config_info`` gauge: the pool the engine was built with, as labels."""
    engine = server.llm.engine
    want = (f'gpt2_triton:cache_config_info{{block_size="16",cache_dtype="float32",enable_prefix_caching="True",'
            f'num_gpu_blocks="{engine.blocks.num_blocks}"}} 1.0')  # fmt: skip
    assert want in server.get("/metrics").text.splitlines()


def test_a_stream_is_measured_on_all_its_tokens(server):
    """A stream's outputs are deltas, one token each: its time per output token is still observed (it is for any
    finished request of more than one token), as is its success."""
    tpot, length = metric(server, "time_per_output_token_seconds_count"), finished(server, "length")
    body = {"model": server.model, "prompt": words(), "max_tokens": random.randint(2, 8), "ignore_eos": True,
            "stream": True, "n": 2}  # fmt: skip
    assert server.post("/v1/completions", json=body).text.endswith("data: [DONE]\n\n")
    assert metric(server, "time_per_output_token_seconds_count") == tpot + 1
    assert finished(server, "length") == length + 2


def finished(server, reason: str) -> float:
    label = f'gpt2_triton:request_success_total{{finished_reason="{reason}"'
    lines = [line for line in server.get("/metrics").text.splitlines() if line.startswith(label)]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def test_disconnect_while_waiting_for_a_whole_completion_aborts_it(server):
    """Not streamed: the client leaves while 64 completions of up to 100 tokens run; they stop early."""
    before = metric(server, "generation_tokens_total")
    prompts = [words() for _ in range(16)]
    body = {"model": server.model, "prompt": prompts, "n": 4, "max_tokens": 100, "ignore_eos": True}
    conn = server.connect()
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 20
    while not metric(server, "num_requests_running"):
        assert time.monotonic() < deadline, "the requests never started"
        time.sleep(0.01)
    conn.sock.shutdown(2)
    conn.close()
    while metric(server, "num_requests_running") or metric(server, "kv_cache_usage_perc"):
        assert time.monotonic() < deadline, "the disconnected requests were not aborted"
        time.sleep(0.05)
    assert metric(server, "generation_tokens_total") - before < 64 * 100


def test_api_key_and_chat_template(tiny_checkpoint, tmp_path, reference):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:")
    live, stop = start_server(tiny_checkpoint, api_key="sekrit", chat_template=str(template))
    try:
        assert error_of(live.get("/v1/models"), 401)["type"] == "authentication_error"
        assert live.get("/health").status_code == 200  # only /v1 is protected
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="sekrit", max_retries=0)
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": words()}]
        out = client.chat.completions.create(model=live.model, messages=messages, max_tokens=8, temperature=0)
        rendered = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
        assert out.choices[0].message.content == expected(reference, rendered, max_tokens=8, temperature=0)[0]
        chunks = client.chat.completions.create(model=live.model, messages=messages, max_tokens=8, temperature=0,
                                                stream=True)  # fmt: skip
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert streamed == out.choices[0].message.content
    finally:
        stop()
    assert live.llm.engine.blocks.num_free == live.llm.engine.blocks.num_blocks


def test_overload_is_503_and_the_server_keeps_serving(tiny_checkpoint):
    live, stop = start_server(tiny_checkpoint, max_waiting=1, max_num_seqs=1)
    try:
        body = {"model": live.model, "prompt": words(), "max_tokens": 100, "ignore_eos": True, "stream": True}
        streams = []
        for busy in (lambda: live.llm.get_stats().num_running, lambda: live.llm.num_waiting):  # one runs, one waits
            streams.append(live.send("POST", "/v1/completions", json=body))
            deadline = time.monotonic() + 10
            while busy() < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert [r.status for _, r in streams] == [200, 200]
        err = error_of(live.post("/v1/completions", json={"prompt": "one too many", "max_tokens": 1}), 503)
        assert err["type"] == "service_unavailable"
        for conn, r in streams:
            events = [line[6:].strip() for line in r.read().decode().splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
            conn.close()
        assert live.post("/v1/completions", json={"prompt": "room now", "max_tokens": 1}).status_code == 200
    finally:
        stop()
