"""The OpenAI-compatible HTTP app (FastAPI): routes translate HTTP to :class:`AsyncLLM`, errors to OpenAI's body.

A client's mistake is a 4xx with ``{"error": {"message", "type", "param", "code"}}``, never a 500: invalid fields and
malformed JSON 400, a missing or wrong API key 401, an unknown model or path 404, a prefix-cache reset while requests
run 409, a body over the limit 413, a full queue or a shutdown 503. A client that disconnects aborts its request
(vLLM's ``with_cancellation``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import engine
from engine.async_llm import AsyncLLM, EngineError, EngineOverloaded
from engine.chat import ChatTemplate
from engine.lora import LoRARequest
from engine.outputs import RequestOutput
from engine.server import serving
from engine.server.embeddings import create_embeddings
from engine.server.metrics import Metrics
from engine.server.models import ServedModels
from engine.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
    error_body,
)

logger = logging.getLogger("gpt2_triton.server")
DEFAULT_MAX_BODY_BYTES = 1 << 20
DRAIN_BYTES = 64 << 20  # a body over the limit is read up to this much before the 413 (larger: the connection drops)


@dataclass
class ServerConfig:
    served_model_names: list[str]
    api_key: str | None = None
    chat_template: str | None = None  # Jinja source; None: chat completions answer 400
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_grace_s: float = 10.0
    created: int = field(default_factory=lambda: int(time.time()))
    lora_modules: list[LoRARequest] = field(default_factory=list)  # adapters served under their own names
    allow_runtime_lora_updating: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter


def error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, status), status_code=status)


def api_error_response(e: ApiError) -> JSONResponse:
    return error_response(e.status, e.message, e.type, e.param)


# --------------------------------------------------------------------------------------------- middleware
class Guard:
    """ASGI middleware before any route: the API key on ``/v1/*`` (401) and the body size limit (413).

    Bodies are read here, up to the limit, whether or not they say their length, then replayed to the app. As the
    outermost layer it is the server's app, and holds its request ``metrics``.
    """

    def __init__(self, app, config: ServerConfig, metrics: Metrics) -> None:
        self.app = app
        self.config = config
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.config.api_key and scope["path"].startswith("/v1"):
            if headers.get("authorization") != f"Bearer {self.config.api_key}":
                response = error_response(401, "missing or wrong API key (Authorization: Bearer ...)",
                                          "authentication_error")  # fmt: skip
                return await response(scope, receive, send)
        limit = self.config.max_body_bytes
        if headers.get("content-length", "").isdigit() and int(headers["content-length"]) > limit:
            return await self._too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await self._too_large(scope, receive, send, more)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send, more: bool = True):
        """413, after reading what is left of a body of reasonable size: a client still sending would not see a
        reply sent before it finished (it gets a reset instead)."""
        drained = 0
        while more and drained < DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        limit = self.config.max_body_bytes
        response = error_response(413, f"request body exceeds {limit} bytes", "invalid_request_error")
        await response(scope, receive, send)


# --------------------------------------------------------------------------------------------- the app
def build_app(
    llm: AsyncLLM,
    config: ServerConfig,
    exposition: Callable[[], Awaitable[bytes]] | None = None,
    reset_prefix_cache: Callable[[], Awaitable[bool]] | None = None,
) -> Guard:
    """The app over ``llm``; its ``.metrics`` record its requests. ``exposition`` makes the body of ``GET /metrics``
    (default: those metrics), ``reset_prefix_cache`` serves ``POST /reset_prefix_cache`` (default: ``llm``'s): a Ray
    replica answers for every replica."""
    metrics = Metrics(llm)
    render_chat = _chat_renderer(llm, config.chat_template) if config.chat_template else None

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await llm.shutdown(config.shutdown_grace_s)

    app = FastAPI(title="gpt2-triton", version=engine.__version__, lifespan=lifespan)
    _install_error_handlers(app)

    served = ServedModels(config.served_model_names, config.lora_modules)

    async def respond(raw: Request, job: serving.Job, full, stream) -> Response:
        """The finished answer (``full``), or the SSE ``stream``; refused with 503 before anything is sent."""
        llm.check_accepting(len(job.requests))
        started = time.monotonic()
        if job.stream:
            chunks = _observed_stream(stream(job), job, metrics, started)
            return StreamingResponse(chunks, media_type="text/event-stream")
        finals = await _until_disconnect(raw, job.finals())
        if finals is None:
            _log_job(job, None, started)
            return Response(status_code=499)
        for out in finals:
            metrics.observe(out, job.completion_tokens(out))
        _log_job(job, finals, started)
        return JSONResponse(full(job, finals))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        model = served.resolve(req.model)
        await serving.compile_structured_outputs(llm, req)
        job = serving.completion_job(llm, model, req)
        return await respond(raw, job, serving.completion_response, serving.completion_stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        model = served.resolve(req.model)
        if render_chat is None:
            raise ApiError(400, "GPT-2 has no chat template: use /v1/completions, or start the server with "
                           "--chat-template FILE (a Jinja template)", "messages")  # fmt: skip
        await serving.compile_structured_outputs(llm, req)
        job = serving.chat_job(llm, model, req, render_chat)
        return await respond(raw, job, serving.chat_response, serving.chat_stream)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        return await create_embeddings(llm, served.resolve(req.model), req)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": served.cards(config.created, llm.engine.max_model_len)}

    if config.allow_runtime_lora_updating:

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(req: LoadLoRAAdapterRequest):
            await served.load(llm, req.lora_name, req.lora_path)
            return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(req: UnloadLoRAAdapterRequest):
            served.unload(req.lora_name)
            return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @app.get("/health")
    async def health():
        if not llm.is_running:
            raise ApiError(503, "the engine is not running")
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": engine.__version__}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        served.resolve(req.model)
        tokens = llm.get_tokenizer().encode(req.prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": llm.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        served.resolve(req.model)
        vocab = llm.engine.config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "tokens")
        return {"prompt": llm.get_tokenizer().decode(req.tokens)}

    @app.post("/reset_prefix_cache")
    async def reset():
        if not await (reset_prefix_cache or llm.reset_prefix_cache)():
            raise ApiError(409, "requests are running: the prefix cache can be reset only while the engine is idle")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics():
        body = await exposition() if exposition is not None else metrics.render()
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return Guard(app, config, metrics)


def _chat_renderer(llm: AsyncLLM, template_source: str):
    eos = llm.get_tokenizer().decode([llm.engine.config.eos_token_id])
    template = ChatTemplate(template_source, eos, "--chat-template")

    def render(messages: list[dict]) -> str:
        try:
            return template.render(messages)
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None

    return render


async def _until_disconnect(raw: Request, work: Awaitable) -> object | None:
    """``await work``, unless the client disconnects first: then cancel it (aborting its requests), return None."""

    async def disconnected():
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _observed_stream(chunks: AsyncIterator[str], job: serving.Job, metrics: Metrics, started: float):
    """The SSE chunks; an engine failure mid-stream becomes an error event; the end is logged and measured."""
    finished = False
    try:
        async for chunk in chunks:
            yield chunk
        finished = True
    except (EngineError, EngineOverloaded) as e:
        status = 503 if isinstance(e, EngineOverloaded) else 500
        yield serving.sse(error_body(str(e), "server_error" if status == 500 else "service_unavailable", None, status))
        yield serving.sse("[DONE]")
    finally:
        finals = [out for out in job.last if out is not None and out.finished] if finished else None
        for out in finals or ():  # a stream's last deltas: its token counts are the job's
            metrics.observe(out, job.completion_tokens(out))
        _log_job(job, finals, started)


def _log_job(job: serving.Job, finals: list[RequestOutput] | None, started: float) -> None:
    elapsed = time.monotonic() - started
    if finals is None:
        logger.info("%s: aborted after %.3f s (client gone or engine failure)", job.id, elapsed)
        return
    usage = job.usage(finals)
    reasons = sorted({c.finish_reason or "abort" for out in finals for c in out.outputs})
    logger.info("%s: %d prompt + %d output tokens, %.3f s, finish %s", job.id, usage["prompt_tokens"],
                usage["completion_tokens"], elapsed, ",".join(reasons))  # fmt: skip


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_req, e: ApiError):
        return api_error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_req, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON: {first.get('msg')}", "invalid_request_error")
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(EngineOverloaded)
    async def overloaded(_req, e: EngineOverloaded):
        return error_response(503, str(e), "service_unavailable")

    @app.exception_handler(EngineError)
    async def engine_failed(_req, e: EngineError):
        return error_response(500, str(e), "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_req, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else
                              "server_error")  # fmt: skip
