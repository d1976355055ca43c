"""``gpt2-triton serve``: the OpenAI-compatible server (``pip install -e ".[serve]"``).

    gpt2-triton serve ./gpt2-medium --port 8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "gpt2-medium", "prompt": "Hello, I am", "max_tokens": 20}'

:func:`serve` binds the socket first (a port in use is the user's mistake, reported as such), loads the engine,
then runs uvicorn until SIGTERM / SIGINT: it stops accepting, lets requests in flight finish for the grace period,
aborts the rest, empties the KV pool and returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass

API_KEY_ENV = "GPT2_TRITON_API_KEY"


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: list[str] | None = None
    api_key: str | None = None
    chat_template: str | None = None  # a file path
    max_waiting: int = 512
    max_body_bytes: int = 1 << 20
    shutdown_grace_s: float = 10.0
    log_level: str = "info"
    lora_modules: list[tuple[str, str]] | None = None  # (name, PEFT adapter directory): served as models of their own
    allow_runtime_lora_updating: bool = False  # adapters loaded and unloaded over HTTP while the server runs


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one); ``ValueError`` if it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    return sock


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"--chat-template: cannot read {path}: {e.strerror}") from None


def build(options: ServeOptions, engine_args: dict, exposition=None, reset_prefix_cache=None):
    """The app and its ``AsyncLLM`` (the engine loaded, its thread started); ``exposition`` and
    ``reset_prefix_cache``: see ``build_app``."""
    from engine.async_llm import AsyncLLM
    from engine.lora import LoRARequest
    from engine.server.app import ServerConfig, build_app

    template = _read_template(options.chat_template)
    model = str(engine_args.get("model", "gpt2-medium"))
    names = options.served_model_names or [os.path.basename(os.path.normpath(model)) or model]
    loras = [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(options.lora_modules or [])]
    if loras or options.allow_runtime_lora_updating:
        engine_args = {**engine_args, "enable_lora": True}
    llm = AsyncLLM.from_engine_args(max_waiting=options.max_waiting, **engine_args)
    try:
        for lora in loras:  # read and checked now: a bad adapter stops the server before it listens
            llm.engine.check_lora(lora, f"--lora-modules {lora.lora_name}")
        config = ServerConfig(names, options.api_key or os.environ.get(API_KEY_ENV) or None, template,
                              options.max_body_bytes, options.shutdown_grace_s, lora_modules=loras,
                              allow_runtime_lora_updating=options.allow_runtime_lora_updating)  # fmt: skip
        return build_app(llm, config, exposition, reset_prefix_cache), llm
    except ValueError:
        llm.stop()
        raise


def _uvicorn_server(config):
    """uvicorn's server, except that SIGTERM / SIGINT end it with exit code 0: uvicorn re-raises the signal it
    caught once it has shut down, which would end the process as killed by it."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(config)


def serve(options: ServeOptions, engine_args: dict) -> int:
    """Run the server until SIGTERM / SIGINT; returns the exit code (0)."""
    import uvicorn

    sock = bind(options.host, options.port)
    try:
        app, llm = build(options, engine_args)  # first: a mistake found building it is all stderr says
        logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("gpt2_triton.server").info("%s", llm.engine.kv_cache_summary())
        config = uvicorn.Config(app, log_level=options.log_level, timeout_graceful_shutdown=options.shutdown_grace_s,
                                lifespan="on")  # fmt: skip
        host, port = sock.getsockname()[:2]
        logging.getLogger("gpt2_triton.server").info("serving on http://%s:%d", host, port)
        _uvicorn_server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
