"""``gpt2-triton serve --replicas 2``: two engine replicas on a local Ray (fractional CPUs) behind one OpenAI
endpoint. Requests are right and spread over both replicas, streams work, ``/metrics`` answers for each replica, a
killed replica is replaced while the other keeps serving, and SIGTERM stops every process Ray started.

One Ray instance serves the whole module (starting one takes most of a minute on two cores)."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import psutil  # a dependency of ray
import pytest

from engine import LLM, SamplingParams
from engine.server.ray_serve import REPLICA_HEADER

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADER = REPLICA_HEADER.decode()
STARTUP_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 30) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
    except OSError:
        return 0, {}, b""


class RayServer:
    def __init__(self, checkpoint) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "engine", "serve", str(checkpoint), "--replicas", "2", "--replica-cpus", "0.5",
               "--port", str(self.port), "--served-model-name", "tiny", "--backend", "torch", "--dtype", "float32",
               "--device", "cpu", "--max-num-seqs", "32", "--log-level", "warning"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while get(self.url + "/health", timeout=5)[0] != 200 or len(self.replicas_serving(6)) < 2:
            assert self.proc.poll() is None, "the server exited while starting"
            assert time.monotonic() < deadline, "the replicas did not come up"
            time.sleep(1)

    def complete(self, prompt: str, max_tokens: int = 6) -> tuple[str, str]:
        """One greedy completion: ``(text, replica)``."""
        raw = self.client.completions.with_raw_response.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                                                temperature=0)  # fmt: skip
        return raw.parse().choices[0].text, raw.headers[HEADER]

    def replicas_serving(self, requests: int) -> set[str]:
        seen = set()
        for _ in range(requests):
            try:
                seen.add(self.complete("hello", 1)[1])
            except openai.APIError:
                pass
        return seen


@pytest.fixture(scope="module")
def ray_server(tiny_checkpoint):
    server = RayServer(tiny_checkpoint)
    started: list[psutil.Process] = []
    try:
        server.wait_ready()
        started = psutil.Process(server.proc.pid).children(recursive=True)
        yield server
    finally:
        started = started or psutil.Process(server.proc.pid).children(recursive=True)
        server.proc.send_signal(signal.SIGTERM)
        try:
            code = server.proc.wait(120)
        finally:
            server.proc.kill()
        gone, alive = psutil.wait_procs(started, timeout=60)
        for p in alive:
            p.kill()
        assert code == 0, f"serve exited with {code} on SIGTERM"
        assert not alive, f"processes Ray started outlived the server: {[p.name() for p in alive]}"


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu", block_size=16, progress=False)


def words() -> str:
    return " ".join(random.choice(["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran"])
                    for _ in range(random.randint(2, 10)))  # fmt: skip


def expected(reference, prompt: str, max_tokens: int = 6) -> str:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return reference.generate(prompt, params, use_tqdm=False)[0].outputs[0].text


def test_twenty_requests_are_right_and_both_replicas_serve(ray_server, reference):
    prompts = [words() for _ in range(20)]
    served = [ray_server.complete(p) for p in prompts]
    assert [text for text, _ in served] == [expected(reference, p) for p in prompts]
    assert len({replica for _, replica in served}) == 2


def test_streaming_through_ray(ray_server, reference):
    prompt = words()
    stream = ray_server.client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert len(chunks) > 2 and chunks[-1].usage.completion_tokens > 0
    assert "".join(c.text for chunk in chunks for c in chunk.choices) == expected(reference, prompt, 12)


def test_metrics_answer_for_every_replica(ray_server):
    ray_server.replicas_serving(4)
    status, _, body = get(ray_server.url + "/metrics")
    assert status == 200
    lines = [line for line in body.decode().splitlines() if line.startswith("gpt2_triton:generation_tokens_total")]
    assert len(lines) == 2 and all('replica="' in line for line in lines)
    assert body.decode().count("# TYPE gpt2_triton:generation_tokens_total counter") == 1


def test_a_killed_replica_is_replaced_and_the_other_keeps_serving(ray_server, reference):
    """Kill the replica serving a long stream: the stream ends at once (cut short, never hanging), the next requests
    are all answered right by the other replica, and Serve starts a new replica in the dead one's place."""
    import ray

    from engine.server.ray_serve import APP_NAME, DEPLOYMENT_NAME

    before = ray_server.replicas_serving(8)
    ray.init(address="auto", log_to_driver=False)
    try:
        body = {"model": "tiny", "prompt": [words() for _ in range(8)], "n": 4, "max_tokens": 100, "stream": True,
                "ignore_eos": True}  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", ray_server.port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        stream = conn.getresponse()
        assert stream.status == 200 and stream.readline().startswith(b"data: ")
        victim = stream.getheader(HEADER)
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#{victim}", namespace="serve"))
    finally:
        ray.shutdown()
    try:
        rest = stream.read()
    except http.client.IncompleteRead as e:
        rest = e.partial
    conn.close()
    assert b"data: [DONE]" not in rest  # cut short: 3200 tokens take far longer than the kill
    for prompt in [words() for _ in range(10)]:  # the survivor answers all of these
        text, replica = ray_server.complete(prompt)
        assert text == expected(reference, prompt) and replica != victim
    deadline = time.monotonic() + 120
    while True:
        now = ray_server.replicas_serving(8)
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(1)
    assert before != now


def test_bad_scaling_flags_are_one_line_and_exit_2(tiny_checkpoint):
    for flags, message in ((["--replicas", "0"], "--replicas must be at least 1"),
                           (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas is larger"),
                           (["--replicas", "2", "--max-replicas", "3"], "--replicas is a fixed count")):  # fmt: skip
        cmd = [sys.executable, "-m", "engine", "serve", str(tiny_checkpoint), *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_merged_metrics_keep_each_replicas_samples():
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from engine.server.metrics import merge_expositions

    texts, observed = {}, {}
    for replica in ("a", "b"):
        registry = CollectorRegistry()
        latency = Histogram("gpt2_triton:e2e_seconds", "doc", buckets=(0.1, 1.0), registry=registry)
        success = Counter("gpt2_triton:request_success", "doc", ["finished_reason"], registry=registry)
        observed[replica] = [random.uniform(0, 2) for _ in range(random.randint(1, 9))]
        for v in observed[replica]:
            latency.observe(v)
        success.labels(finished_reason="length").inc(len(observed[replica]))
        texts[replica] = generate_latest(registry)
    merged = {f.name: f for f in text_string_to_metric_families(merge_expositions(texts).decode())}
    for replica, values in observed.items():
        samples = {(s.name, s.labels.get("le")): s.value for s in merged["gpt2_triton:e2e_seconds"].samples
                   if s.labels["replica"] == replica}  # fmt: skip
        assert samples["gpt2_triton:e2e_seconds_count", None] == len(values)
        assert samples["gpt2_triton:e2e_seconds_bucket", "1.0"] == sum(v <= 1.0 for v in values)
        assert samples["gpt2_triton:e2e_seconds_sum", None] == pytest.approx(sum(values))
        total = [s for s in merged["gpt2_triton:request_success"].samples if s.labels["replica"] == replica]
        assert total[0].value == len(values) and total[0].labels["finished_reason"] == "length"
