"""A live server per test module: uvicorn in a background thread, on 127.0.0.1 and a free port, stopped after."""

from __future__ import annotations

import http.client
import json as jsonlib
import threading
import time
from dataclasses import dataclass

import pytest


@dataclass
class Reply:
    """An HTTP response, read whole (raw HTTP through the standard library: no client library in between)."""

    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self):
        return jsonlib.loads(self.content)


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    model: str
    llm: object  # the AsyncLLM behind it
    port: int = 0

    def connect(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def send(self, method: str, path: str, json=None, content: bytes | None = None, headers=None):
        """Send a request and return the open response (for streams); the caller closes the connection."""
        conn = self.connect()
        body = jsonlib.dumps(json).encode() if json is not None else content
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=hdrs)
        return conn, conn.getresponse()

    def request(self, method: str, path: str, **kw) -> Reply:
        conn, r = self.send(method, path, **kw)
        try:
            return Reply(r.status, r.read())
        finally:
            conn.close()

    def get(self, path: str, **kw) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw) -> Reply:
        return self.request("POST", path, **kw)


def start_server(checkpoint, engine_args: dict | None = None, **options):
    """Start a server on the tiny checkpoint (``engine_args`` added to the engine's); returns ``(LiveServer,
    stop)``."""
    import uvicorn

    from engine.server import ServeOptions, bind, build

    engine_args = dict(model=str(checkpoint), backend="torch", dtype="float32", device="cpu", progress=False,
                       max_num_seqs=options.pop("max_num_seqs", 96), block_size=16, **(engine_args or {}))  # fmt: skip
    opts = ServeOptions(host="127.0.0.1", port=0, served_model_names=["tiny-gpt2"], **options)
    sock = bind(opts.host, opts.port)
    app, llm = build(opts, engine_args)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=opts.shutdown_grace_s)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = sock.getsockname()[1]

    def stop():
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"

    return LiveServer(f"http://127.0.0.1:{port}", "tiny-gpt2", llm, port), stop


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    live, stop = start_server(tiny_checkpoint)
    yield live
    stop()
