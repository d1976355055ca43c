"""``AsyncLLM``: an asyncio front over :class:`LLMEngine` (vLLM v1's ``AsyncLLM`` in spirit).

The engine steps in one background thread, the only one that touches it after start-up; coroutines talk to it
through a command queue (add, abort, stop) and receive each request's outputs on an asyncio queue of their own::

    llm = AsyncLLM(LLMEngine("gpt2-medium"))
    async for out in llm.generate(llm.make_request("a", "Hello", SamplingParams(max_tokens=20))):
        print(out.outputs[0].text)          # cumulative: the text so far

Leaving the ``async for`` early (a client that went away, a cancelled task) aborts the request, and its blocks are
free within one step. At most ``max_waiting`` requests wait for the scheduler; past that ``generate`` raises
:class:`EngineOverloaded` at once instead of queueing without bound. If a step raises, the requests it was running
get :class:`EngineError` and the engine keeps serving the others.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from engine.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from engine.llm_engine import LLMEngine, Prompt
from engine.lora import LoRARequest
from engine.outputs import EngineStats, RequestOutput
from engine.pooling import check_pooling, embed
from engine.sampling_params import SamplingParams
from engine.sequence import Request

logger = logging.getLogger("gpt2_triton.engine")
DEFAULT_MAX_WAITING = 512
T = TypeVar("T")


class EngineOverloaded(RuntimeError):
    """Too many requests are waiting already, or the engine is shutting down: try again later (HTTP 503)."""


class EngineError(RuntimeError):
    """The engine failed while running this request (HTTP 500); other requests go on."""


@dataclass
class _Stream:
    """Where the engine thread delivers one request's outputs: an asyncio queue, filled from the loop's thread."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)
        except RuntimeError:  # its event loop is closed: nobody is listening any more
            pass


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    """Complete a future with the engine thread's answer (in its loop's thread), unless its caller gave up."""
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _answer(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result, error: BaseException | None) -> None:
    try:
        loop.call_soon_threadsafe(_settle, future, result, error)
    except RuntimeError:  # its event loop is closed: nobody is waiting any more
        pass


class AsyncLLM:
    def __init__(self, engine: LLMEngine, max_waiting: int = DEFAULT_MAX_WAITING) -> None:
        if not isinstance(max_waiting, int) or isinstance(max_waiting, bool) or max_waiting < 1:
            raise ValueError(f"max_waiting must be a positive integer, got {max_waiting!r}")
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._active: set[str] = set()  # ids of the requests a generate() is serving (the event loop's side)
        self._streams: dict[str, _Stream] = {}  # request id -> stream of the requests added (the engine thread's)
        self._stats = engine.get_stats()  # refreshed by the engine thread after every step
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="gpt2-triton-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, max_waiting: int = DEFAULT_MAX_WAITING, **engine_args) -> AsyncLLM:
        """Build the ``LLMEngine`` from ``LLM``'s arguments, load its tokenizer, and start stepping."""
        engine = LLMEngine(**engine_args)
        engine.has_tokenizer()  # load it now, not inside the first request (reading vocab.json takes seconds)
        return cls(engine, max_waiting)

    # ---------------------------------------------------------------- requests in
    def make_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> Request:
        """Validate a request (``ValueError`` naming what is wrong) without queueing it."""
        if request_id in self._active:
            raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request")
        return self.engine.make_request(request_id, prompt, params, priority=priority, lora_request=lora_request)

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Queue ``request`` and yield its outputs as the engine produces them (as its ``output_kind`` asks:
        cumulative by default), the last one finished."""
        self.check_accepting()
        if request.request_id in self._active:
            raise ValueError(f"request_id {request.request_id!r} is already in use by an unfinished request")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._active.add(request.request_id)
        self._commands.put(("add", (request, stream)))
        finished = False
        try:
            while not finished:
                item = await stream.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._active.discard(request.request_id)
            if not finished:  # the consumer went away, or the engine failed it: free its blocks
                self.abort(request.request_id)

    async def beam_search(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: BeamSearchParams,
        lora_request: LoRARequest | None = None,
    ) -> BeamSearchOutput:
        """Beam search of one prompt among whatever else the engine runs. Each step's beams are one-token
        requests (ids ``{request_id}-{step}-{beam}``) whose prefixes the prefix cache serves, vLLM's way: unlike
        ``LLM.beam_search``, which has the engine to itself and forks each beam from its parent's blocks, every
        step computes each beam's partly filled last block again. Cancelling it aborts the step's requests."""
        search = BeamSearch(prompt_token_ids, params, self.engine.config.eos_token_id)
        step = 0
        while not search.done:
            requests = [
                self.make_request(f"{request_id}-{step}-{b}", prompt_token_ids + beam.tokens, search.step_params(beam),
                                  lora_request=lora_request)
                for b, beam in enumerate(search.running)
            ]  # fmt: skip
            finals = await asyncio.gather(*(self._final(r) for r in requests))
            search.advance([out.outputs[0].logprobs[0] for out in finals])
            step += 1
        return search.output()

    async def embed(
        self,
        token_lists: list[list[int]],
        pooling: str = "last",
        normalize: bool = True,
        lora_request: LoRARequest | None = None,
    ) -> list[torch.Tensor]:
        """Embeddings of whole token lists (:func:`engine.pooling.embed`; the lists fit the context, the adapter was
        checked), computed in the engine's thread between two steps."""
        check_pooling(pooling, normalize)
        return await self._in_engine_thread(lambda: embed(self.engine, token_lists, pooling, normalize, lora_request))

    async def reset_prefix_cache(self) -> bool:
        """The engine's :meth:`~engine.llm_engine.LLMEngine.reset_prefix_cache`, between two steps: False (nothing
        forgotten) while requests are unfinished."""
        return await self._in_engine_thread(self.engine.reset_prefix_cache)

    async def _in_engine_thread(self, fn: Callable[[], T]) -> T:
        """``fn()``'s result, run by the engine thread between two steps (the model is the thread's alone)."""
        self.check_accepting()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put(("call", (fn, loop, future)))
        return await future

    async def _final(self, request: Request) -> RequestOutput:
        async for out in self.generate(request):
            last = out
        return last

    def check_accepting(self, num_requests: int = 1) -> None:
        """Raise :class:`EngineOverloaded` unless ``num_requests`` more may queue now."""
        if not self._accepting:
            raise EngineOverloaded("the engine is shutting down")
        if self.num_waiting + num_requests > self.max_waiting:
            raise EngineOverloaded(f"{self.num_waiting} requests are waiting already (max_waiting={self.max_waiting})")

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    # ---------------------------------------------------------------- state
    @property
    def num_waiting(self) -> int:
        """Requests not yet admitted by the scheduler: queued to the engine thread, or waiting in the engine."""
        return self._stats.num_waiting + self._commands.qsize()

    def get_stats(self) -> EngineStats:
        return self._stats

    def get_tokenizer(self):
        return self.engine.get_tokenizer()

    def check_structured_outputs(self, structured_outputs) -> None:
        """Compile ``structured_outputs``' grammar now (kept for the requests that use it); ``ValueError`` naming the
        field that cannot be compiled."""
        self.engine.grammar(structured_outputs)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    async def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop taking requests, let those in flight finish for up to ``grace_s``, abort the rest, stop the thread."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self.stop)

    def stop(self) -> None:
        """Abort whatever is left and stop the engine thread (blocking)."""
        self._accepting = False
        self._commands.put(("stop", None))
        self._thread.join(30.0)

    # ---------------------------------------------------------------- the engine thread
    def _run(self) -> None:
        engine = self.engine
        while True:
            block = not engine.has_unfinished_requests()
            if not self._apply_commands(block):
                break
            if not engine.has_unfinished_requests():
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # the step's requests were aborted by the engine; tell their streams
                logger.exception("engine step failed")
                self._fail_lost_requests(e)
                continue
            finally:
                self._stats = engine.get_stats()
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if out.finished:
                    self._streams.pop(out.request_id, None)
                if stream is not None:
                    stream.put(out)
        self._abort_all()

    def _apply_commands(self, block: bool) -> bool:
        """Apply what the coroutines asked for (waiting for a command when the engine is idle); False on stop."""
        while True:
            try:
                kind, arg = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "add":
                request, stream = arg
                try:
                    self.engine.add(request)
                except ValueError as e:  # validated on the way in; a race on its id is all that is left
                    stream.put(e)
                    continue
                self._streams[request.request_id] = stream
            elif kind == "abort" and self._streams.pop(arg, None) is not None:
                self.engine.abort_request(arg)
            elif kind == "call":
                fn, loop, future = arg
                try:
                    result, error = fn(), None
                except Exception as e:  # the caller's to handle
                    result, error = None, e
                _answer(loop, future, result, error)
            self._stats = self.engine.get_stats()

    def _fail_lost_requests(self, error: Exception) -> None:
        lost = [request_id for request_id in self._streams if request_id not in self.engine.requests]
        for request_id in list(lost):
            self._streams.pop(request_id).put(EngineError(f"the engine failed while running this request: {error}"))

    def _abort_all(self) -> None:
        while not self._commands.empty():  # what was queued behind the stop never runs: its callers hear why
            kind, arg = self._commands.get()
            if kind == "call":
                _answer(arg[1], arg[2], None, EngineOverloaded("the engine stopped"))
            elif kind == "add":
                arg[1].put(EngineOverloaded("the engine stopped"))
        self.engine.abort_request(list(self.engine.requests))
        for stream in list(self._streams.values()):
            stream.put(EngineOverloaded("the engine stopped"))
        self._streams.clear()
        self._stats = self.engine.get_stats()
