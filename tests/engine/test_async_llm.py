"""``AsyncLLM``: the engine stepping in its thread while coroutines add, stream and abandon requests."""

from __future__ import annotations

import asyncio
import random

import pytest

from engine import LLM, LLMEngine, SamplingParams
from engine.async_llm import AsyncLLM, EngineError, EngineOverloaded
from tests.helpers import assert_engine_empty


def make(checkpoint, max_waiting=64, **kw) -> AsyncLLM:
    engine = LLMEngine(str(checkpoint), backend="torch", dtype="float32", device="cpu", progress=False, **kw)
    return AsyncLLM(engine, max_waiting=max_waiting)


def ids(n: int) -> list[int]:
    return [random.randrange(50257) for _ in range(n)]


async def final(llm: AsyncLLM, request):
    outputs = [out async for out in llm.generate(request)]
    return outputs[-1]


def test_concurrent_requests_equal_llm_generate(tiny_checkpoint):
    llm = make(tiny_checkpoint)
    prompts = [ids(random.randint(1, 30)) for _ in range(8)]
    params = [SamplingParams(max_tokens=random.randint(1, 12), temperature=0, ignore_eos=True) for _ in prompts]

    async def run():
        requests = [llm.make_request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
        return await asyncio.wait_for(asyncio.gather(*(final(llm, r) for r in requests)), 120)

    try:
        outs = asyncio.run(run())
    finally:
        llm.stop()
    ref = LLM(str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu", progress=False)
    want = ref.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [w.outputs[0].token_ids for w in want]
    assert all(o.finished for o in outs)
    assert_engine_empty(llm.engine)


def test_leaving_a_stream_aborts_the_request(tiny_checkpoint):
    llm = make(tiny_checkpoint)

    async def run():
        request = llm.make_request("long", ids(10), SamplingParams(max_tokens=100, ignore_eos=True))
        stream = llm.generate(request)
        first = await stream.__anext__()
        assert not first.finished
        await stream.aclose()  # the consumer goes away
        for _ in range(200):  # the engine thread applies the abort before its next step
            if llm.get_stats().num_running == 0 and not llm.engine.requests:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the abandoned request is still running")

    try:
        asyncio.run(run())
    finally:
        llm.stop()
    assert_engine_empty(llm.engine)


def test_full_queue_and_shutdown_refuse_at_once(tiny_checkpoint):
    llm = make(tiny_checkpoint, max_waiting=2, max_num_seqs=1)

    async def run():
        params = SamplingParams(max_tokens=60, ignore_eos=True)
        streams = [llm.generate(llm.make_request(f"r{i}", ids(5), params)) for i in range(3)]
        await streams[0].__anext__()  # running
        waiting = [asyncio.ensure_future(s.__anext__()) for s in streams[1:]]  # queued: the queue is full
        await asyncio.sleep(0.05)
        with pytest.raises(EngineOverloaded, match="max_waiting"):
            await llm.generate(llm.make_request("over", ids(5), params)).__anext__()
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        for s in streams:
            await s.aclose()
        await llm.shutdown(grace_s=5)
        with pytest.raises(EngineOverloaded, match="shutting down"):
            await llm.generate(llm.make_request("late", ids(5), params)).__anext__()

    asyncio.run(run())
    assert not llm.is_running
    assert_engine_empty(llm.engine)


@pytest.mark.parametrize("stage", ["runner.execute", "sampler.sample"])
def test_an_engine_failure_fails_its_requests_and_the_engine_goes_on(tiny_checkpoint, monkeypatch, stage):
    """A step that fails in the forward pass, or after it (the sampler: its sequences computed but given no token),
    ends its requests with the error; the next request runs as if nothing happened."""
    llm = make(tiny_checkpoint)
    owner_name, method_name = stage.split(".")
    owner = getattr(llm.engine, owner_name)
    method = getattr(owner, method_name)
    calls = {"n": 0}

    def fails_once(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError(f"injected failure in {stage}")
        return method(*args)

    monkeypatch.setattr(owner, method_name, fails_once)

    async def run():
        with pytest.raises(EngineError, match="injected"):
            await final(llm, llm.make_request("doomed", ids(5), SamplingParams(max_tokens=4)))
        return await final(llm, llm.make_request("fine", ids(5), SamplingParams(max_tokens=4, ignore_eos=True)))

    try:
        out = asyncio.run(asyncio.wait_for(run(), 60))
    finally:
        llm.stop()
    assert out.finished and len(out.outputs[0].token_ids) == 4
    assert_engine_empty(llm.engine)


def test_bad_requests_are_refused_before_queueing(tiny_checkpoint):
    llm = make(tiny_checkpoint)
    try:
        with pytest.raises(ValueError, match="exceeds the model's context"):
            llm.make_request("big", ids(120), SamplingParams(max_tokens=20))
        with pytest.raises(ValueError, match="max_waiting"):
            AsyncLLM(llm.engine, max_waiting=0)
    finally:
        llm.stop()


def test_embeddings_run_in_the_engine_thread_and_stop_with_it(tiny_checkpoint):
    """``embed`` between steps equals ``LLM.embed``; once the engine stops, an embedding is refused (503's error),
    and one queued behind the stop hears so instead of waiting forever."""
    import torch

    llm = make(tiny_checkpoint)
    texts = [ids(random.randint(1, 30)) for _ in range(3)]

    async def embed_while_generating():
        request = llm.make_request("g", ids(5), SamplingParams(max_tokens=8, ignore_eos=True))
        generated, vectors = await asyncio.gather(final(llm, request), llm.embed(texts, pooling="mean"))
        return generated, vectors

    try:
        generated, vectors = asyncio.run(asyncio.wait_for(embed_while_generating(), 120))
    finally:
        llm.stop()
    ref = LLM(str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu", progress=False)
    want = [torch.tensor(o.outputs.embedding) for o in ref.embed(texts, pooling="mean")]
    assert generated.finished and all(torch.allclose(v, w, rtol=1e-5, atol=1e-6) for v, w in zip(vectors, want))
    with pytest.raises(EngineOverloaded):
        asyncio.run(llm.embed(texts))

    async def queued_behind_the_stop():  # what the thread's last act does with a call it will never run
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        llm._commands.put(("call", (lambda: 1, loop, future)))
        llm._abort_all()
        return await asyncio.wait_for(future, 10)

    with pytest.raises(EngineOverloaded, match="stopped"):
        asyncio.run(queued_behind_the_stop())
