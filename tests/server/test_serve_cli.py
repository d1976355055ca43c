"""``gpt2-triton serve`` as a process: it serves, shuts down cleanly on SIGTERM with requests in flight, and a
user's mistake (no such model, a port in use) is one line on stderr and exit code 2."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine", "serve", *args]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": ROOT}


def wait_for_port(proc: subprocess.Popen, timeout: float = 120, log: list[str] | None = None) -> int:
    """Read the server's log until it says where it listens (its lines before that appended to ``log``)."""
    found: list[int] = []

    def read():
        for line in proc.stderr:
            if log is not None:
                log.append(line)
            if "serving on http://" in line:
                found.append(int(line.rsplit(":", 1)[1].strip().strip("/")))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert found, "the server never said where it listens"
    return found[0]


def test_sigterm_with_requests_in_flight_exits_0(tiny_checkpoint):
    """Also: vLLM's ``--max-model-len`` reaches the engine (``/v1/models`` reports it, and the start-up log line
    of the KV pool's concurrency)."""
    cap = random.randint(80, 127)
    flags = ["--port", "0", "--backend", "torch", "--device", "cpu", "--shutdown-grace", "20", "--max-model-len"]
    proc = subprocess.Popen(
        serve_cmd(str(tiny_checkpoint), *flags, str(cap)),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env(),
        cwd=ROOT,
    )
    try:
        log: list[str] = []
        port = wait_for_port(proc, log=log)
        assert any("KV cache: " in line and f"for {cap} tokens per request" in line for line in log), log
        models = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        models.request("GET", "/v1/models")
        assert json.loads(models.getresponse().read())["data"][0]["max_model_len"] == cap
        models.close()
        conns = []
        for _ in range(3):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            body = {"prompt": "Once upon a time", "max_tokens": 60, "stream": True, "ignore_eos": True}
            conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200 and response.readline().startswith(b"data: ")  # in flight
            conns.append((conn, response))
        proc.send_signal(signal.SIGTERM)
        for conn, response in conns:  # the requests in flight finish within the grace period
            events = [line for line in response.read().decode().splitlines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            conn.close()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "case", ["no such model", "port in use", "bad template", "bad adapter", "bad lora flag", "runtime lora on ray"]
)
def test_mistakes_are_one_line_and_exit_2(tiny_checkpoint, tmp_path, case):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    args = {
        "no such model": ["/nonexistent/model", "--port", "0"],
        "port in use": [str(tiny_checkpoint), "--port", str(busy.getsockname()[1])],
        "bad template": [str(tiny_checkpoint), "--port", "0", "--chat-template", str(tmp_path / "missing.jinja")],
        "bad adapter": [str(tiny_checkpoint), "--port", "0", "--lora-modules", f"ours={tmp_path / 'missing'}"],
        "bad lora flag": [str(tiny_checkpoint), "--port", "0", "--lora-modules", "no-directory-given"],
        "runtime lora on ray": [str(tiny_checkpoint), "--replicas", "2", "--allow-runtime-lora-updating"],
    }[case]
    try:
        r = subprocess.run(serve_cmd(*args, "--device", "cpu"), capture_output=True, text=True, env=env(), cwd=ROOT,
                           timeout=120)  # fmt: skip
    finally:
        busy.close()
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert {"no such model": "nonexistent", "port in use": "cannot listen", "bad template": "chat-template",
            "bad adapter": "--lora-modules ours: LoRA adapter directory", "bad lora flag": "expected NAME=DIR",
            "runtime lora on ray": "does not combine with Ray Serve"}[
        case
    ] in lines[0]  # fmt: skip
