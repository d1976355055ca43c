"""The client: one streamed ``/v1/completions`` per request (SSE), sent at Poisson arrival times, at most
``--max-concurrency`` in flight; what each request saw, timed on this side."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field

from .servers import Server
from .workload import Workload


@dataclass
class RequestResult:
    """One streamed request, as the client saw it. Times in seconds, from just before the request was sent."""

    index: int
    prompt_tokens: int
    expected_output_tokens: int
    start_s: float = 0.0  # since the run started
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None  # to the first chunk carrying text
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between chunks carrying text
    chunks: int = 0  # chunks carrying text
    output_tokens: int = 0  # usage.completion_tokens, else chunks
    output_tokens_from: str = "chunks"
    server_prompt_tokens: int | None = None  # usage.prompt_tokens
    server_cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens: prefix-cache hits
    finish_reason: str | None = None
    text: str = ""

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None for a one-token completion."""
        if not self.ok or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def row(self) -> dict:
        return {**asdict(self), "tpot_s": self.tpot_s}

    def take_event(self, event: dict, now: float, sent: float, last_text: float) -> float:
        """Fold one SSE chunk in; returns the time of the latest chunk that carried text."""
        choice = (event.get("choices") or [{}])[0]
        if choice.get("text"):
            if self.ttft_s is None:
                self.ttft_s = now - sent
            else:
                self.itl_s.append(now - last_text)
            last_text = now
            self.chunks += 1
            self.text += choice["text"]
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        usage = event.get("usage") or {}
        if usage.get("completion_tokens") is not None:
            self.output_tokens, self.output_tokens_from = usage["completion_tokens"], "usage"
        if usage:
            self.server_prompt_tokens = usage.get("prompt_tokens")
            self.server_cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        return last_text


class RequestFailed(Exception):
    """The server answered with an error (status, error event or a truncated stream)."""


def parse_sse(line: str) -> dict | str | None:
    """The JSON of a ``data: {...}`` line, "[DONE]", or None for blank lines, comments and other fields."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return payload
    return json.loads(payload) if payload else None


async def stream_completion(client, url: str, body: dict, r: RequestResult) -> None:
    """POST one streaming completion and fill ``r`` from its SSE chunks."""
    sent = last_text = time.perf_counter()
    done = False
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            detail = (await resp.aread()).decode(errors="replace")
            raise RequestFailed(f"HTTP {resp.status_code}: {detail[:300]}")
        async for line in resp.aiter_lines():
            event = parse_sse(line.strip())
            if event == "[DONE]":
                done = True
                break
            if isinstance(event, dict) and "error" in event:
                raise RequestFailed(f"error event: {json.dumps(event['error'])[:300]}")
            if event is not None:
                last_text = r.take_event(event, time.perf_counter(), sent, last_text)
    r.e2e_s = time.perf_counter() - sent
    if not done and r.finish_reason is None:
        raise RequestFailed("the stream ended before [DONE] or a finish_reason")
    if r.output_tokens_from == "chunks":
        r.output_tokens = r.chunks
    r.ok = True


async def send_request(client, url: str, body: dict, r: RequestResult, timeout_s: float) -> RequestResult:
    """One request, bounded by ``timeout_s``; any failure lands in ``r.error``, nothing is raised."""
    try:
        await asyncio.wait_for(stream_completion(client, url, body, r), timeout_s)
    except asyncio.TimeoutError:
        r.error = f"timed out after {timeout_s:g} s"
    except Exception as e:  # every failure is a counted error, never the end of the run
        r.error = str(e) if isinstance(e, RequestFailed) else f"{type(e).__name__}: {e}"
    if r.error is not None:
        r.ok = False
    return r


def request_body(server: Server, w: Workload, i: int, args) -> dict:
    """A greedy streaming completion of prompt ``i`` (vLLM's benchmark sends temperature 0 too)."""
    n = w.output_lens[i]
    body = {"prompt": w.prompt(i, server.prompt_format), "max_tokens": n, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    body.update(server.eos_extras(n, args.ignore_eos), **args.extra_body)
    models = getattr(args, "lora_models", None)
    if models:  # LoRA adapters served as models: request i asks for the i-th, round robin
        body["model"] = models[i % len(models)]
    elif server.model is not None:
        body["model"] = server.model
    return body


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times (s from the start): all at 0 for an infinite rate, else gaps drawn from a gamma distribution with
    mean ``1 / rate`` and shape ``burstiness`` (1: a Poisson process)."""
    if math.isinf(rate):
        return [0.0] * n
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


def make_client(timeout_s: float):
    """An async HTTP client without connection limits (every request in flight needs its connection), ignoring
    proxies from the environment (the benchmark talks to the server directly). httpx2 is openai 3.x's client, httpx
    its predecessor's: the same API."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0))
    return httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)


async def run_load(server: Server, w: Workload, rate: float, args, seed: int) -> tuple[list[RequestResult], float, int]:
    """Send every request of ``w`` at its arrival time (gated by ``--max-concurrency``); returns
    ``(results, duration_s, peak requests in flight)``."""
    url = server.base_url + "/v1/completions"
    gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()
    in_flight, peak = 0, 0

    async def one(client, i: int, start: float) -> RequestResult:
        nonlocal in_flight, peak
        async with gate:
            r = RequestResult(i, len(w.prompt_ids[i]), w.output_lens[i], start_s=time.perf_counter() - start)
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await send_request(client, url, request_body(server, w, i, args), r, args.timeout)
            finally:
                in_flight -= 1

    async with make_client(args.timeout) as client:
        start, tasks = time.perf_counter(), []
        for i, at in enumerate(arrival_offsets(len(w), rate, args.burstiness, seed)):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, i, start)))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start, peak


async def warm_up(server: Server, w: Workload, args) -> dict:
    """``w``'s requests one after the other, untimed (the first request of transformers' continuous batching builds
    its cache); the first one's text is kept to compare the servers' greedy outputs."""
    url, rows = server.base_url + "/v1/completions", []
    async with make_client(args.timeout) as client:
        for i in range(len(w)):
            r = RequestResult(i, len(w.prompt_ids[i]), w.output_lens[i])
            rows.append(await send_request(client, url, request_body(server, w, i, args), r, args.timeout))
    first = rows[0]
    return dict(requests=len(rows), ok=sum(r.ok for r in rows), errors=[r.error for r in rows if r.error],
                text=first.text, output_tokens=first.output_tokens, e2e_s=first.e2e_s)  # fmt: skip
