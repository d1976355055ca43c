"""The servers under test: a URL already answering, or ours / ``transformers serve`` launched here on 127.0.0.1 and a
free port, in their own process group, and always stopped."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import ROOT

SERVER_KINDS = ("ours", "transformers", "transformers-cb")
TRANSFORMERS_KINDS = ("transformers", "transformers-cb")
# what transformers serve's /v1/completions (transformers 5.x) does not do, said when one of its requests fails
TRANSFORMERS_LIMITS = (
    "transformers serve takes text prompts only (400 for token ids), answers 422 to fields it does not know (vLLM's "
    "ignore_eos, min_tokens, top_k, ...; EOS is turned off through its generation_config field instead) and ignores "
    "n, logprobs, echo and stream_options"
)


@dataclass
class Server:
    """One server under test: how it was started, where it answers, and how requests to it are shaped."""

    name: str  # label in tables and plots
    kind: str  # ours | transformers | transformers-cb | url
    base_url: str = ""
    model: str | None = None  # the "model" field of requests (default: the first id /v1/models lists)
    prompt_format: str = "ids"  # ids: token-id lists in "prompt"; text: the decoded text
    command: list[str] | None = None  # launched servers
    log_path: str | None = None
    startup_s: float | None = None
    error: str | None = None  # why it could not be benchmarked
    warmup: dict | None = None

    def eos_extras(self, output_len: int, ignore_eos: bool) -> dict:
        """Body fields that make the completion run to ``max_tokens``: vLLM's ``ignore_eos`` + ``min_tokens``; for
        transformers serve, which refuses unknown fields (422), a ``generation_config`` whose ``eos_token_id`` is -1
        (its continuous batching disables EOS that way; ``generate`` warns and never stops)."""
        if not ignore_eos:
            return {}
        if self.kind in TRANSFORMERS_KINDS:
            return {"generation_config": json.dumps({"eos_token_id": -1})}
        return {"ignore_eos": True, "min_tokens": output_len}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS picks it; the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ours_command(checkpoint: Path, port: int, args) -> list[str]:
    """``gpt2-triton serve`` (vLLM's ``vllm serve`` flags) as ``python -m engine serve``."""
    cmd = [sys.executable, "-m", "engine", "serve", str(checkpoint), "--host", "127.0.0.1", "--port", str(port)]
    flags = {"--dtype": args.dtype, "--device": args.device, "--backend": args.backend,
             "--max-num-seqs": args.max_num_seqs, "--max-num-batched-tokens": args.max_num_batched_tokens}  # fmt: skip
    for flag, value in flags.items():
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + shlex.split(args.ours_args)


def transformers_command(checkpoint: Path, port: int, args, continuous_batching: bool, cb_num_blocks: int) -> list:
    """``transformers serve CHECKPOINT`` (the checkpoint preloaded), with or without ``--continuous-batching``.

    Its continuous batching sizes the KV cache to 90% of the free device memory, which on a CPU is the machine's RAM
    (7.5 GB for a 2-layer model, 18 s of zero-filling at its first request): it gets ``cb_num_blocks`` instead,
    unless ``--transformers-args`` sets ``--cb-num-blocks``."""
    cli = Path(sys.executable).with_name("transformers")
    cmd = [str(cli) if cli.exists() else "transformers", "serve", str(checkpoint), "--host", "127.0.0.1",
           "--port", str(port), "--device", args.device]  # fmt: skip
    if args.dtype is not None:
        cmd += ["--dtype", args.dtype]
    if continuous_batching:
        cmd.append("--continuous-batching")
        if "--cb-num-blocks" not in args.transformers_args:
            cmd += ["--cb-num-blocks", str(cb_num_blocks)]
    return cmd + shlex.split(args.transformers_args)


def cb_blocks_for(in_flight: int, longest_request: int, page_size: int = 256) -> int:
    """KV blocks of transformers' continuous batching (``page_size`` tokens each, its default) for ``in_flight``
    requests of ``longest_request`` positions, with a quarter more for its scheduler's safety margin."""
    return math.ceil(in_flight * math.ceil(longest_request / page_size) * 1.25) + 1


def launched_server(kind: str, checkpoint: Path, log_dir: Path, args, cb_num_blocks: int) -> Server:
    """A server of ``kind`` to launch. transformers serve refuses token-id prompts (400 "prompt must be a string"),
    so by default it gets the same tokens as text."""
    port = free_port()
    if kind == "ours":
        command = ours_command(checkpoint, port, args)
    else:
        command = transformers_command(checkpoint, port, args, kind == "transformers-cb", cb_num_blocks)
    fmt = args.prompt_format if args.prompt_format != "auto" else ("ids" if kind == "ours" else "text")
    return Server(kind, kind, f"http://127.0.0.1:{port}", args.model, fmt, command=command,
                  log_path=str(log_dir / f"{kind}.log"))  # fmt: skip


def ray_server(replicas: int, checkpoint: Path, log_dir: Path, args) -> Server:
    """Ours on Ray Serve (``gpt2-triton serve --replicas N``, the ray extra), named ``ours-rayN``."""
    port = free_port()
    command = ours_command(checkpoint, port, args) + ["--replicas", str(replicas)]
    name = f"ours-ray{replicas}"
    fmt = "text" if args.prompt_format == "text" else "ids"
    return Server(name, "ours", f"http://127.0.0.1:{port}", args.model, fmt, command=command,
                  log_path=str(log_dir / f"{name}.log"))  # fmt: skip


def http_get_json(url: str, timeout: float = 5.0) -> tuple[int, object]:
    """(status, parsed JSON or None) of a GET; (0, None) when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, None
    except (OSError, ValueError):
        return 0, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def http_post(url: str, timeout: float = 10.0) -> int:
    """The status of a POST without a body; 0 when nothing answered."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return 0


def reset_prefix_cache(server: Server) -> str:
    """``POST /reset_prefix_cache`` (ours and vLLM's): how it went, in words for the log."""
    status = http_post(server.base_url + "/reset_prefix_cache")
    if status == 200:
        return "prefix cache reset"
    if status == 404:
        return "no /reset_prefix_cache (404): its prefix cache, if any, is kept"
    return f"prefix cache not reset (HTTP {status})"


def discover_model(base_url: str) -> str | None:
    """The first model id ``/v1/models`` lists (transformers serve wants its checkpoint path; ours its served name)."""
    status, body = http_get_json(base_url + "/v1/models")
    if status == 200 and isinstance(body, dict) and body.get("data"):
        return body["data"][0].get("id")
    return None


def log_tail(log_path: str, lines: int = 8) -> str:
    try:
        tail = Path(log_path).read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return "no log"
    return f"last lines of {log_path}:\n    " + "\n    ".join(tail)


def wait_ready(base_url: str, proc: subprocess.Popen, timeout_s: float, log_path: str) -> None:
    """Poll ``/health`` (or ``/v1/models``) until it answers 200; fail early if the server process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before answering; {log_tail(log_path)}")
        if any(http_get_json(base_url + path, timeout=2.0)[0] == 200 for path in ("/health", "/v1/models")):
            return
        time.sleep(0.5)
    raise RuntimeError(f"no answer from {base_url}/health within {timeout_s:g} s; {log_tail(log_path)}")


def stop_process(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the server's process group, SIGKILL after ``grace_s`` (and to anything of the group left)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers the server left behind
    proc.wait()


@contextlib.contextmanager
def launched(server: Server, startup_timeout_s: float, grace_s: float) -> Iterator[Server]:
    """Start ``server.command`` in its own process group, wait until it answers, yield; always stop it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("HF_HUB_OFFLINE", "1")  # a local checkpoint: never wait on a hub
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    with open(server.log_path, "wb") as log_file:
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(server.command, stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=ROOT, env=env, start_new_session=True)  # fmt: skip
        except OSError as e:  # e.g. no `transformers` command: transformers is not installed here
            raise RuntimeError(f"could not start {server.command[0]}: {e}") from None
        try:
            wait_ready(server.base_url, proc, startup_timeout_s, server.log_path)
            server.startup_s = time.perf_counter() - start
            yield server
        finally:
            stop_process(proc, grace_s)
