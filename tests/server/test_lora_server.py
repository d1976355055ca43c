"""LoRA adapters behind the server (``--lora-modules``), through the official ``openai`` client: each adapter is a
model of its own name, answering as ``LLM`` does with that adapter, concurrently with the base model and the other
adapter; ``/v1/models`` lists them; an unknown name is a 404 and a bad adapter stops the server before it listens."""

from __future__ import annotations

import asyncio
import random

import openai
import pytest
import torch

from engine import LLM, BeamSearchParams, LoRARequest, SamplingParams
from engine.server import ServeOptions, build
from tests.helpers import make_adapter, make_hf_model, rel_err, save_checkpoint
from tests.server.conftest import start_server

ENGINE = dict(backend="torch", dtype="float32", device="cpu", progress=False)
LORA_ARGS = dict(max_loras=2, max_lora_rank=8)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, gpt2_tokenizer_dir):
    """A base checkpoint (with the GPT-2 tokenizer) and two adapters of it: ``(base dir, {name: dir})``."""
    base = make_hf_model()
    root = tmp_path_factory.mktemp("lora-server")
    save_checkpoint(base, root / "base", gpt2_tokenizer_dir)
    make_adapter(base, root / "alpha", r=4, target_modules=["c_attn", "c_fc"])
    make_adapter(base, root / "beta", r=8, target_modules=["c_proj"])
    return root / "base", {"alpha": str(root / "alpha"), "beta": str(root / "beta")}


@pytest.fixture(scope="module")
def lora_server(adapters):
    base, paths = adapters
    live, stop = start_server(base, LORA_ARGS, lora_modules=list(paths.items()))
    yield live
    stop()


def greedy_texts(base, paths: dict, prompts: list[str], names: list[str | None], max_tokens: int) -> list[str]:
    """What ``LLM`` writes for each prompt under its adapter (None: the base model)."""
    llm = LLM(str(base), enable_lora=True, **LORA_ARGS, **ENGINE)
    ids = {name: i + 1 for i, name in enumerate(paths)}  # the server numbers them in the order given
    loras = [None if n is None else LoRARequest(n, ids[n], paths[n]) for n in names]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [out.outputs[0].text for out in llm.generate(prompts, params, use_tqdm=False, lora_request=loras)]


def test_each_adapter_answers_under_its_own_name_concurrently(lora_server, adapters):
    base, paths = adapters
    names = [random.choice(["alpha", "beta", None]) for _ in range(9)]
    prompts = [f"Request {i}: the weather today is" for i in range(len(names))]
    want = greedy_texts(base, paths, prompts, names, 6)
    client = openai.AsyncOpenAI(base_url=lora_server.url + "/v1", api_key="none", max_retries=0)

    async def ask(prompt, name):
        out = await client.completions.create(model=name or lora_server.model, prompt=prompt, max_tokens=6,
                                              temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
        assert out.model == (name or lora_server.model)
        return out.choices[0].text

    async def ask_all():
        try:
            return await asyncio.gather(*(ask(p, n) for p, n in zip(prompts, names)))
        finally:
            await client.close()

    assert asyncio.run(ask_all()) == want
    assert len({w for w, n in zip(want, names)}) > 1, "the adapters change nothing: the test could not fail"


def test_an_adapter_streams_what_it_answers_whole(lora_server, adapters):
    base, paths = adapters
    prompt = "Once upon a time"
    want = greedy_texts(base, paths, [prompt], ["beta"], 8)[0]
    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key="none", max_retries=0)
    stream = client.completions.create(model="beta", prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == want


def test_an_adapter_s_beam_search(lora_server, adapters):
    """``use_beam_search`` under an adapter's name: the beams ``LLM.beam_search`` finds with that adapter."""
    base, paths = adapters
    llm = LLM(str(base), enable_lora=True, **LORA_ARGS, **ENGINE)
    want = llm.beam_search("The sea", BeamSearchParams(3, 5), use_tqdm=False,
                           lora_request=LoRARequest("beta", 2, paths["beta"]))[0]  # fmt: skip
    r = lora_server.post("/v1/completions", json={"model": "beta", "prompt": "The sea", "max_tokens": 5, "n": 3,
                                                  "use_beam_search": True})  # fmt: skip
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == [s.text.removeprefix("The sea") for s in want.sequences]
    base_beams = llm.beam_search("The sea", BeamSearchParams(3, 5), use_tqdm=False)[0]
    assert [s.text for s in base_beams.sequences] != [s.text for s in want.sequences], "the adapter changed nothing"


def test_an_adapter_s_embeddings(lora_server, adapters):
    base, paths = adapters
    llm = LLM(str(base), enable_lora=True, **LORA_ARGS, **ENGINE)
    want = llm.embed("A short text", lora_request=LoRARequest("alpha", 1, paths["alpha"]))[0].outputs.embedding
    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key="none", max_retries=0)
    got = client.embeddings.create(model="alpha", input="A short text").data[0].embedding
    base_vector = client.embeddings.create(model=lora_server.model, input="A short text").data[0].embedding
    assert rel_err(torch.tensor(got), torch.tensor(want)) < 1e-6
    assert rel_err(torch.tensor(base_vector), torch.tensor(want)) > 1e-3, "the adapter changed nothing"


def test_models_lists_the_adapters_and_unknown_names_are_404(lora_server, adapters):
    _, paths = adapters
    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key="none", max_retries=0)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {lora_server.model, "alpha", "beta"}
    assert models["alpha"].parent == lora_server.model and models["alpha"].root == paths["alpha"]
    with pytest.raises(openai.NotFoundError, match="'gamma' does not exist"):
        client.completions.create(model="gamma", prompt="Hi", max_tokens=2)
    metrics = lora_server.get("/metrics").text
    assert 'gpt2_triton:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}' in metrics


def test_adapters_load_and_unload_at_run_time(adapters):
    """``--allow-runtime-lora-updating``: an adapter loaded over HTTP answers as ``LLM`` does with it, is listed, and
    once unloaded is a 404; names already served, bad directories and unknown names are refused by name. Without
    the flag the routes do not exist."""
    base, paths = adapters
    live, stop = start_server(base, LORA_ARGS, allow_runtime_lora_updating=True)
    try:
        assert [m["id"] for m in live.get("/v1/models").json()["data"]] == [live.model]
        r = live.post("/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": paths["beta"]})
        assert r.status_code == 200 and "beta" in r.text
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
        prompt = "The meaning of life is"
        out = client.completions.create(model="beta", prompt=prompt, max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})  # fmt: skip
        want = greedy_texts(base, {"beta": paths["beta"]}, [prompt], ["beta"], 6)[0]
        assert out.choices[0].text == want
        assert [m["id"] for m in live.get("/v1/models").json()["data"]] == [live.model, "beta"]
        refusals = [
            ("/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": paths["alpha"]}, 400, "already served"),
            ("/v1/load_lora_adapter", {"lora_name": live.model, "lora_path": paths["alpha"]}, 400, "already served"),
            ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nonexistent"}, 400, "does not exist"),
            ("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path"),
            ("/v1/unload_lora_adapter", {"lora_name": "alpha"}, 404, "no LoRA adapter 'alpha'"),
        ]
        for path, body, status, match in refusals:
            r = live.post(path, json=body)
            assert r.status_code == status and match in r.json()["error"]["message"], (path, body, r.text)
        assert live.post("/v1/unload_lora_adapter", json={"lora_name": "beta"}).status_code == 200
        with pytest.raises(openai.NotFoundError, match="'beta' does not exist"):
            client.completions.create(model="beta", prompt=prompt, max_tokens=2)
        r = live.post("/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": paths["alpha"]})
        assert r.status_code == 200  # the name again, other files: a new adapter
        again = client.completions.create(model="beta", prompt=prompt, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})  # fmt: skip
        assert again.choices[0].text == greedy_texts(base, {"alpha": paths["alpha"]}, [prompt], ["alpha"], 6)[0]
    finally:
        stop()


def test_without_the_flag_adapters_cannot_be_loaded(lora_server, adapters):
    r = lora_server.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": adapters[1]["alpha"]})
    assert r.status_code == 404


@pytest.mark.parametrize("case", ["missing", "clash"])
def test_a_bad_adapter_stops_the_server_before_it_listens(adapters, tmp_path, case):
    base, paths = adapters
    modules, match = {
        "missing": ([("alpha", paths["alpha"]), ("ghost", str(tmp_path / "ghost"))], "--lora-modules ghost: LoRA"),
        "clash": ([("tiny-gpt2", paths["alpha"])], "'tiny-gpt2' is taken twice"),
    }[case]
    options = ServeOptions(port=0, served_model_names=["tiny-gpt2"], lora_modules=modules)
    with pytest.raises(ValueError, match=match):
        build(options, dict(model=str(base), **LORA_ARGS, **ENGINE))
