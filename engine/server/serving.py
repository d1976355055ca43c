"""Completions and chat completions: requests through :class:`AsyncLLM`, answers in OpenAI's exact shapes.

One HTTP request may hold several prompts (completions) and ``n`` samples each; OpenAI numbers its choices
``prompt_index * n + sample_index``. Non-streamed answers wait for every request to finish; streamed ones send a
chunk per choice whenever it has new tokens (its text delta, with a stop string never partly shown), then a usage
chunk if asked, then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from engine.async_llm import AsyncLLM
from engine.beam_search import BeamSearchParams, generated
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import RequestOutputKind
from engine.sequence import Request
from engine.server.models import Served
from engine.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, SamplingFields

_DONE = object()


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' output streams as outputs arrive: ``(stream index, output)``. Leaving early (or an
    error in one) closes every stream, which aborts their requests."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except Exception as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, _DONE))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Job:
    """One HTTP request's engine requests and how to present them.

    A stream asks the engine for ``DELTA`` outputs (each holds only what is new); the job keeps what the stream needs
    across them: how many tokens each choice has sent (the usage), the prompt logprobs (sent with a request's first
    output, echoed with each choice's first chunk)."""

    llm: AsyncLLM
    model: str
    requests: list[Request]
    prompt_texts: list[str]  # for echo
    echo: bool
    stream: bool
    include_usage: bool
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    last: list[RequestOutput | None] = field(default_factory=list)  # each request's latest output, when streaming
    sent_tokens: dict[str, list[int]] = field(default_factory=dict)  # streaming: request id -> tokens sent per sample
    prompt_logprobs: list[list | None] = field(default_factory=list)  # streaming: each request's, once received

    @property
    def n(self) -> int:
        return self.requests[0].params.n

    def choice_index(self, prompt_index: int, sample_index: int) -> int:
        return prompt_index * self.n + sample_index

    def completion_tokens(self, final: RequestOutput) -> list[int]:
        """Tokens of each completion of a request's final output; a stream's last output is a delta, so the tokens
        its stream sent."""
        if self.stream:
            return self.sent_tokens[final.request_id]
        return [len(c.token_ids) for c in final.outputs]

    def usage(self, finals: list[RequestOutput]) -> dict:
        """OpenAI's usage, with ``prompt_tokens_details.cached_tokens``: the prompt tokens the prefix cache served."""
        prompt = sum(len(out.prompt_token_ids) for out in finals)
        completion = sum(sum(self.completion_tokens(out)) for out in finals)
        cached = sum(out.num_cached_tokens for out in finals)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip

    async def finals(self) -> list[RequestOutput]:
        """Every request's final output, in prompt order."""
        finals: list[RequestOutput | None] = [None] * len(self.requests)
        async for i, out in merge([self.llm.generate(r) for r in self.requests]):
            if out.finished:
                finals[i] = out
        return finals  # type: ignore[return-value]

    async def deltas(self) -> AsyncIterator[tuple[int, RequestOutput, CompletionOutput, str, bool]]:
        """Per choice with new tokens: ``(prompt index, output, completion, its text to send, whether it is the
        choice's first)``; the last ones finished. ``completion`` holds the new tokens only (a ``DELTA`` output)."""
        self.last = [None] * len(self.requests)
        self.prompt_logprobs = [None] * len(self.requests)
        self.sent_tokens = {r.request_id: [0] * r.params.n for r in self.requests}
        async for i, out in merge([self.llm.generate(r) for r in self.requests]):
            self.last[i] = out
            if out.prompt_logprobs is not None:
                self.prompt_logprobs[i] = out.prompt_logprobs
            sent = self.sent_tokens[out.request_id]
            for c in out.outputs:
                if not c.token_ids:
                    continue
                first = sent[c.index] == 0
                sent[c.index] += len(c.token_ids)
                yield i, out, c, self.prompt_texts[i] + c.text if self.echo and first else c.text, first


@dataclass
class BeamJob(Job):
    """``use_beam_search``: each request's prompt is searched (:meth:`AsyncLLM.beam_search`) instead of sampled;
    its final output holds the ``n`` beams as completions, best first."""

    beams: BeamSearchParams | None = None

    async def finals(self) -> list[RequestOutput]:
        searches = [self.llm.beam_search(r.request_id, r.prompt_token_ids, self.beams, r.lora_request)
                    for r in self.requests]  # fmt: skip
        outputs = await asyncio.gather(*searches)
        tokenizer = self.llm.get_tokenizer()
        finals = []
        for request, out in zip(self.requests, outputs):
            completions = []
            for j, seq in enumerate(out.sequences):
                tokens, text = generated(seq, len(request.prompt_token_ids), tokenizer)
                completions.append(CompletionOutput(j, text, tokens, seq.cum_logprob, seq.finish_reason))
            finals.append(RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions,
                                        finished=True))  # fmt: skip
        return finals


def sse(obj: dict | str) -> str:
    """One server-sent event."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------- completions
def logprobs_object(tokenizer, tokens: list[tuple[int, dict[int, float] | None]], offset: int) -> dict:
    """OpenAI's legacy logprobs object for ``(token id, its logprob entry)`` pairs; ``offset``: characters before the
    first. An entry of ``None`` (the first prompt token, which nothing predicts) gives ``null`` s, as OpenAI's."""
    texts, token_logprobs, top, offsets = [], [], [], []
    for token_id, entry in tokens:
        text = token_text(tokenizer, token_id)
        texts.append(text)
        token_logprobs.append(None if entry is None else entry[token_id])
        ranked = sorted((entry or {}).items(), key=lambda kv: -kv[1])
        top.append(None if entry is None else {token_text(tokenizer, t): lp for t, lp in ranked})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def completion_logprobs(tokenizer, out: RequestOutput, c: CompletionOutput, offset: int,
                        prompt_logprobs: list | None = None) -> dict | None:  # fmt: skip
    """The logprobs of a completion's tokens (a stream's delta: its new ones), after its prompt's when
    ``prompt_logprobs`` are given (echo, from the completion's first token)."""
    if c.logprobs is None:
        return None
    tokens = list(zip(c.token_ids, c.logprobs))
    if prompt_logprobs is not None:
        tokens = list(zip(out.prompt_token_ids, prompt_logprobs)) + tokens
    return logprobs_object(tokenizer, tokens, offset)


def completion_response(job: Job, finals: list[RequestOutput]) -> dict:
    tokenizer = job.llm.get_tokenizer() if any(r.params.logprobs is not None for r in job.requests) else None
    choices = []
    for i, out in enumerate(finals):
        prefix = job.prompt_texts[i] if job.echo else ""
        for c in out.outputs:
            choices.append({
                "index": job.choice_index(i, c.index),
                "text": prefix + c.text,
                "logprobs": completion_logprobs(tokenizer, out, c, 0, out.prompt_logprobs if job.echo else None),
                "finish_reason": c.finish_reason,
            })  # fmt: skip
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
            "choices": choices, "usage": job.usage(finals)}  # fmt: skip


async def completion_stream(job: Job) -> AsyncIterator[str]:
    tokenizer = job.llm.get_tokenizer() if any(r.params.logprobs is not None for r in job.requests) else None
    offsets: dict[tuple[int, int], int] = {}  # text offset of each choice's next token
    async for i, out, c, text, first in job.deltas():
        start = offsets.get((i, c.index), 0)
        logprobs = completion_logprobs(tokenizer, out, c, start, job.prompt_logprobs[i] if job.echo and first else None)
        if logprobs is not None:
            offsets[i, c.index] = start + sum(map(len, logprobs["tokens"]))
        choice = {"index": job.choice_index(i, c.index), "text": text, "logprobs": logprobs,
                  "finish_reason": c.finish_reason}  # fmt: skip
        yield sse({"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
                   "choices": [choice]})  # fmt: skip
    if job.include_usage:
        yield sse({"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
                   "choices": [], "usage": job.usage(job.last)})  # fmt: skip
    yield sse("[DONE]")


# --------------------------------------------------------------------------------------------- chat
def chat_logprobs(tokenizer, c: CompletionOutput) -> dict | None:
    """The chat API's logprobs of a completion's tokens (a stream's delta: its new ones): ``{"content": [{"token",
    "logprob", "bytes", "top_logprobs": [...]}]}``."""
    if c.logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        raw = tokenizer.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    content = []
    for token_id, entries in zip(c.token_ids, c.logprobs):
        others = sorted(((t, lp) for t, lp in entries.items()), key=lambda kv: -kv[1])
        content.append({**entry(token_id, entries[token_id]), "top_logprobs": [entry(t, lp) for t, lp in others]})
    return {"content": content}


def chat_response(job: Job, finals: list[RequestOutput]) -> dict:
    tokenizer = job.llm.get_tokenizer()
    choices = [
        {"index": c.index, "message": {"role": "assistant", "content": c.text},
         "logprobs": chat_logprobs(tokenizer, c), "finish_reason": c.finish_reason}
        for c in finals[0].outputs
    ]  # fmt: skip
    return {"id": job.id.replace("cmpl-", "chatcmpl-"), "object": "chat.completion", "created": job.created,
            "model": job.model, "choices": choices, "usage": job.usage(finals)}  # fmt: skip


async def chat_stream(job: Job) -> AsyncIterator[str]:
    tokenizer = job.llm.get_tokenizer()
    head = {"id": job.id.replace("cmpl-", "chatcmpl-"), "object": "chat.completion.chunk", "created": job.created,
            "model": job.model}  # fmt: skip
    for j in range(job.n):  # OpenAI opens each choice with the assistant's role
        yield sse({**head, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})  # fmt: skip
    async for _, _, c, text, _ in job.deltas():
        choice = {"index": c.index, "delta": {"content": text}, "logprobs": chat_logprobs(tokenizer, c),
                  "finish_reason": c.finish_reason}  # fmt: skip
        yield sse({**head, "choices": [choice]})
    if job.include_usage:
        yield sse({**head, "choices": [], "usage": job.usage(job.last)})
    yield sse("[DONE]")


# --------------------------------------------------------------------------------------------- requests in
def prompt_list(prompt, field: str = "prompt") -> list[str | list[int]]:
    """OpenAI's ``prompt`` (or embeddings' ``input``): a string, a list of strings, a list of token ids, or a list of
    such lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, f"{field} must not be empty", field)
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def check_common(req: SamplingFields) -> None:
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
    if req.cache_salt == "":
        raise ApiError(400, "cache_salt must be a non-empty string", "cache_salt")


async def compile_structured_outputs(llm: AsyncLLM, req: SamplingFields) -> None:
    """Build the index of the request's structured outputs, if any, in a worker thread (any JSON object takes
    seconds: the other requests keep streaming meanwhile); the requests made next find it built. An ``ApiError``
    (400) names the field that cannot be compiled."""
    structured = req.structured_outputs_params()
    if structured is not None:
        try:
            await asyncio.to_thread(llm.check_structured_outputs, structured)
        except ValueError as e:
            raise ApiError(400, f"{req.structured_field}: {e}", req.structured_field) from None


def make_job(llm: AsyncLLM, model: Served, req: SamplingFields, prompts: list, max_tokens: int,
             logprobs: int | None, echo: bool = False, prompt_logprobs: int | None = None) -> Job:  # fmt: skip
    """Validate everything and build the engine requests: an ``ApiError`` (400) names what is wrong. With
    ``use_beam_search`` the requests are the prompts, checked as ``n`` full copies, that the beam searches run.
    ``model``: the name the client asked for, and the LoRA adapter it stands for (if any)."""
    check_common(req)
    beams = None
    if req.use_beam_search:
        beams = req.beam_search_params(max_tokens)
        if logprobs is not None:
            raise ApiError(400, "logprobs are not supported with use_beam_search", "logprobs")
    try:
        params = req.sampling_params(max_tokens, logprobs, prompt_logprobs)
        # one output per request at its end (no per-step outputs or detokenizing on the way), or what is new per step
        kind = RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY
        params = replace(params, output_kind=kind)
    except ValueError as e:
        raise ApiError(400, str(e), str(e).split()[0]) from None
    if req.priority and llm.engine.scheduling_policy != "priority":
        raise ApiError(400, "priority needs the server started with --scheduling-policy priority", "priority")
    job_id = f"cmpl-{uuid.uuid4().hex}"
    requests = []
    for i, prompt in enumerate(prompts):
        if req.cache_salt is not None:  # vLLM's prompt dict carries it
            prompt = {"prompt" if isinstance(prompt, str) else "prompt_token_ids": prompt, "cache_salt": req.cache_salt}
        try:
            requests.append(llm.make_request(f"{job_id}-{i}", prompt, params, priority=req.priority,
                                             lora_request=model.lora_request))  # fmt: skip
        except ValueError as e:
            raise ApiError(400, str(e).replace(f"request '{job_id}-{i}'", f"prompt {i}"), "prompt") from None
    texts = [p if isinstance(p, str) else "" for p in prompts]
    if echo:  # the prompt as the model read it: a truncated one from its tokens
        tokenizer, whole = llm.get_tokenizer(), params.truncate_prompt_tokens is None
        texts = [
            p if isinstance(p, str) and whole else tokenizer.decode(r.prompt_token_ids)
            for p, r in zip(prompts, requests)
        ]
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if beams is not None:
        return BeamJob(llm, model.name, requests, texts, echo, req.stream, include_usage, id=job_id, beams=beams)
    return Job(llm, model.name, requests, texts, echo, req.stream, include_usage, id=job_id)


def completion_job(llm: AsyncLLM, model: Served, req: CompletionRequest) -> Job:
    if req.suffix is not None:
        raise ApiError(400, "suffix is not supported: GPT-2 does not fill in the middle", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise ApiError(400, f"best_of={req.best_of} is not supported (only best_of == n)", "best_of")
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    prompt_logprobs = req.logprobs if req.echo else None  # echoed prompts come with their logprobs
    return make_job(llm, model, req, prompt_list(req.prompt), max_tokens, req.logprobs, req.echo, prompt_logprobs)


def chat_job(llm: AsyncLLM, model: Served, req: ChatCompletionRequest, render: Callable[[list[dict]], str]) -> Job:
    prompt = render([m.model_dump(exclude_none=True) for m in req.messages])
    max_tokens = req.max_completion_tokens or req.max_tokens or 16
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    return make_job(llm, model, req, [prompt], max_tokens, logprobs)
