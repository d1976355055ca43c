"""Property tests of the server's rule for bad input: whatever JSON a client sends to the completion, chat and
tokenizer routes, the answer is a 200 (a stream that ends in ``[DONE]``) or a 4xx with OpenAI's error body, never a
5xx, and the server goes on serving with every KV block back. Bodies mix each field's valid values with edge values
and wrong types; hypothesis shrinks a failure to the smallest body that shows it."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import start_server

BIG = 1 << 70  # past every integer type the engine keeps
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
JUNK = st.one_of(  # any JSON value, and values near the API's (token ids out of range, nested lists)
    st.none(), st.booleans(), st.integers(-BIG, BIG), st.floats(allow_nan=True), TEXT,
    st.lists(st.integers(-BIG, BIG), max_size=3), st.lists(st.lists(st.integers(-3, 60000), max_size=3), max_size=2),
    st.dictionaries(TEXT, st.integers(), max_size=2),
)  # fmt: skip


SAMPLING = {  # each field's valid values, edges included
    "max_tokens": st.integers(0, 6),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "n": st.integers(1, 3),
    "stream": st.booleans(),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=4)),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(st.integers(0, 50256).map(str), st.floats(-100, 100), max_size=3),
    "seed": st.integers(-(1 << 63), (1 << 64) - 1),
    "top_k": st.integers(-1, 60000),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0.01, 3),
    "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(st.integers(0, 50256), max_size=3),
    "min_tokens": st.integers(0, 3),
    "user": TEXT,
    "use_beam_search": st.booleans(),
    "length_penalty": st.floats(-2, 2),
    "guided_choice": st.lists(TEXT, max_size=3),
    "guided_regex": st.sampled_from(["[ab]{1,3}", "x+", "(", ""]),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json"}]),
}
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT})
ROUTES = {
    "/v1/completions": (
        {"prompt": st.one_of(TEXT.filter(str.strip), st.lists(st.integers(0, 50256), min_size=1, max_size=6))},
        {"logprobs": st.integers(0, 5), "echo": st.booleans(), **SAMPLING},
    ),
    "/v1/chat/completions": (
        {"messages": st.lists(MESSAGE, min_size=1, max_size=3)},
        {"max_completion_tokens": st.integers(0, 6), "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5),
         **SAMPLING},
    ),
    "/tokenize": ({"prompt": TEXT}, {"model": st.just("tiny-gpt2")}),
    "/detokenize": ({"tokens": st.lists(st.integers(0, 50256), max_size=8)}, {"model": st.just("tiny-gpt2")}),
    "/v1/embeddings": (
        {"input": st.one_of(TEXT.filter(str.strip), st.lists(TEXT.filter(str.strip), min_size=1, max_size=3),
                            st.lists(st.integers(0, 50256), min_size=1, max_size=6))},
        {"model": st.just("tiny-gpt2"), "encoding_format": st.sampled_from(["float", "base64"]),
         "normalize": st.booleans(), "dimensions": st.integers(0, 100), "truncate_prompt_tokens": st.integers(-2, 9)},
    ),
}  # fmt: skip
EXTRA = ("suffix", "best_of", "stream_options", "tools", "structured_outputs")  # fields to set to anything


def bodies(path: str) -> st.SearchStrategy:
    """Request bodies for ``path``: valid ones (any subset of the optional fields), valid ones with one field set to
    anything at all (a field of the route's, or one it may not have), and anything at all."""
    required, optional = ROUTES[path]
    valid = st.fixed_dictionaries(required, optional=optional)
    names = st.sampled_from([*required, *optional, *EXTRA]) | TEXT
    one_bad = st.builds(lambda body, name, value: {**body, name: value}, valid, names, JUNK)
    return st.one_of(valid, valid, one_bad, one_bad, JUNK)


@pytest.fixture(scope="module")
def chat_server(tiny_checkpoint, tmp_path_factory):
    template = tmp_path_factory.mktemp("chat") / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:")
    live, stop = start_server(tiny_checkpoint, chat_template=str(template))
    yield live
    stop()


def check_answer(server, path: str, body) -> None:
    """A 200 that is whole, or a 4xx with OpenAI's error body; after it the KV pool holds nothing of the request."""
    content = json.dumps(body).encode()  # Python's json writes NaN / Infinity, as some clients do
    reply = server.post(path, content=content)
    assert reply.status_code < 500, reply.text
    if reply.status_code == 200:
        text = reply.text
        if text.startswith("data: "):
            assert text.endswith("data: [DONE]\n\n")
        else:
            answer = json.loads(text)
            expected = {"/v1/completions": "choices", "/v1/chat/completions": "choices", "/v1/embeddings": "data"}
            assert expected[path] in answer if path in expected else answer
    else:
        error = reply.json()["error"]
        assert 400 <= reply.status_code < 500 and set(error) == {"message", "type", "param", "code"}
        assert error["message"]
    blocks = server.llm.engine.blocks
    assert blocks.num_free == blocks.num_blocks  # the answer came whole, so nothing of the request is left


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


@FUZZ
@given(body=bodies("/v1/completions"))
def test_any_completion_body_gets_a_whole_answer_or_a_4xx(chat_server, body):
    check_answer(chat_server, "/v1/completions", body)


@FUZZ
@given(body=bodies("/v1/chat/completions"))
def test_any_chat_body_gets_a_whole_answer_or_a_4xx(chat_server, body):
    check_answer(chat_server, "/v1/chat/completions", body)


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_any_tokenizer_or_embeddings_body_gets_an_answer_or_a_4xx(chat_server, data):
    path = data.draw(st.sampled_from(["/tokenize", "/detokenize", "/v1/embeddings"]))
    check_answer(chat_server, path, data.draw(bodies(path)))
