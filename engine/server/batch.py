"""``gpt2-triton run-batch``: OpenAI's Batch API files, offline (vLLM's ``run-batch``).

Each input line is a request, ``{"custom_id": ..., "method": "POST", "url": "/v1/completions", "body": {...}}``
(``/v1/chat/completions`` with ``--chat-template``, or ``/v1/embeddings``); each output line is its answer, in input
order, ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}``. The requests go
through the server's own app, in process (no socket), so a body means exactly what it means to ``serve``: a request
the server would refuse gets its 4xx body in its line, and the others run. A file that is not a batch (a line that
is not a request object, an unknown url, a repeated ``custom_id``) is refused before the model loads, and the output
is written whole at the end, or not at all.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from engine.progress import progress_bar
from engine.server.protocol import error_body

URLS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")


@dataclass
class BatchRequest:
    custom_id: str
    url: str
    body: dict


def read_batch(path: str | os.PathLike) -> list[BatchRequest]:
    """The requests of a batch file; ``ValueError`` naming the first line that is not one."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the batch file {path}: {e}") from None
    requests, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        request = _batch_request(line, where)
        if request.custom_id in seen:
            raise ValueError(f"{where}: custom_id {request.custom_id!r} is used twice")
        seen.add(request.custom_id)
        requests.append(request)
    if not requests:
        raise ValueError(f"the batch file {path} holds no requests")
    return requests


def _batch_request(line: str, where: str) -> BatchRequest:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg})") from None
    shaped = isinstance(item, dict) and isinstance(item.get("custom_id"), str) and isinstance(item.get("body"), dict)
    if not shaped:
        raise ValueError(f'{where}: a request is {{"custom_id": str, "method": "POST", "url": ..., "body": {{}}}}')
    if item.get("method", "POST") != "POST" or item.get("url") not in URLS:
        raise ValueError(f"{where}: {item.get('method')} {item.get('url')} is not one of POST {', '.join(URLS)}")
    return BatchRequest(item["custom_id"], item["url"], item["body"])


async def post(app, path: str, body: bytes) -> tuple[int, bytes]:
    """``POST path`` to an ASGI app in process: its status and body. The client never disconnects."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
    }  # fmt: skip
    sent = False
    status, chunks = 500, []

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect ever comes (a check for one is cancelled)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def answer(app, request: BatchRequest) -> dict:
    """One output line: the app's answer to the request (a stream is refused: a batch line holds one body)."""
    if request.body.get("stream"):
        status, body = 400, error_body("stream is not supported in a batch", "invalid_request_error", "stream", 400)
    else:
        status, raw = await post(app, request.url, json.dumps(request.body).encode())
        body = json.loads(raw)
    response = {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": request.custom_id, "response": response, "error": None}


async def run_batch(app, requests: list[BatchRequest], concurrency: int, progress: bool = True) -> list[dict]:
    """Every request's output line, in order; at most ``concurrency`` in the engine's hands at once."""
    slots = asyncio.Semaphore(concurrency)
    with progress_bar(total=len(requests), desc="run-batch", unit="req", disable=not progress) as bar:

        async def one(request: BatchRequest) -> dict:
            async with slots:
                line = await answer(app, request)
            bar.update(1)
            return line

        return await asyncio.gather(*(one(r) for r in requests))


def write_lines(path: str | os.PathLike, lines: list[dict]) -> None:
    """The output file, whole: written beside it, then moved into place."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    os.replace(partial, path)


def main(options, engine_args: dict, input_file: str, output_file: str, concurrency: int, progress: bool) -> int:
    """Read the batch, load the engine and the app, answer every request, write the output; returns 0."""
    from engine.server import build

    requests = read_batch(input_file)
    if not Path(output_file).resolve().parent.is_dir():
        raise ValueError(f"the output file's directory {Path(output_file).parent} does not exist")
    app, llm = build(options, engine_args)
    try:
        lines = asyncio.run(run_batch(app, requests, concurrency, progress))
    finally:
        llm.stop()
    write_lines(output_file, lines)
    return 0
