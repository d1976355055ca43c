"""``POST /v1/embeddings`` through the official ``openai`` client: the vectors ``LLM.embed`` returns, in base64 (the
client's default) and as floats, for text and token inputs, beside generation on the same engine; bad fields are
400s naming them."""

from __future__ import annotations

import asyncio
import random

import openai
import pytest
import torch

from engine import LLM
from tests.helpers import rel_err


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu", progress=False)


def test_embeddings_are_llm_embed_s_in_both_encodings(client, server, reference):
    texts = [f"sentence number {random.randint(0, 999)} is about {w}" for w in ("cats", "rain", "maths")]
    tokens = [random.randrange(50256) for _ in range(random.randint(1, 30))]
    want = [torch.tensor(o.outputs.embedding) for o in reference.embed([*texts, tokens])]
    base64 = client.embeddings.create(model=server.model, input=texts)  # the client asks for base64 and decodes it
    floats = client.embeddings.create(model=server.model, input=texts, encoding_format="float")
    for out in (base64, floats):
        assert [d.index for d in out.data] == [0, 1, 2] and out.model == server.model
        for d, w in zip(out.data, want):
            assert rel_err(torch.tensor(d.embedding), w) < 1e-6
        assert out.usage.prompt_tokens == sum(len(reference.get_tokenizer().encode(t)) for t in texts)
    one = client.embeddings.create(model=server.model, input=tokens, encoding_format="float").data
    assert len(one) == 1 and rel_err(torch.tensor(one[0].embedding), want[3]) < 1e-6
    raw = server.post("/v1/embeddings", json={"input": "Hi there", "normalize": False}).json()["data"][0]["embedding"]
    assert torch.tensor(raw).norm() > 1.5, "normalize=false still normalized"


def test_embeddings_run_beside_generation(server):
    """The model is the engine thread's alone: embeddings wait for a step's end instead of racing it."""
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)

    async def both():
        try:
            return await asyncio.gather(
                *(client.completions.create(model=server.model, prompt=f"Story {i}:", max_tokens=12) for i in range(4)),
                *(client.embeddings.create(model=server.model, input=[f"text {i}"] * 3) for i in range(4)),
            )
        finally:
            await client.close()

    results = asyncio.run(both())
    assert all(len(r.data) == 3 for r in results[4:]) and all(r.choices for r in results[:4])


@pytest.mark.parametrize(
    "body, status, param",
    [({"input": []}, 400, "input"), ({"input": "hi", "dimensions": 7}, 400, "dimensions"),
     ({"input": [[1] * 300]}, 400, "input"), ({"input": [[1, 70000]]}, 400, "input"),
     ({"input": "hi", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
     ({"input": "hi", "model": "nope"}, 404, "model"), ({"input": "hi", "encoding_format": "hex"}, 400, None)],
)  # fmt: skip
def test_bad_fields_are_named(server, body, status, param):
    r = server.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    if param is not None:
        assert r.json()["error"]["param"] == param


def test_truncation_keeps_the_last_tokens(server, reference):
    tokens = [random.randrange(50256) for _ in range(300)]
    r = server.post("/v1/embeddings", json={"input": tokens, "truncate_prompt_tokens": 100})
    want = reference.embed(tokens[-100:])[0].outputs.embedding
    assert rel_err(torch.tensor(r.json()["data"][0]["embedding"]), torch.tensor(want)) < 1e-6
