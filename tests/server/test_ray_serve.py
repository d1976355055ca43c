"""``gpt2-triton serve --replicas 2``: two engine replicas on a local Ray (fractional CPUs) behind one OpenAI
endpoint. Requests are right and spread over both replicas, streams work, ``/metrics`` answers for each replica, a
killed replica is replaced while the other keeps serving (what it held ends in a 503 or an error event), and SIGTERM
stops every process Ray started.

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
from concurrent.futures import ThreadPoolExecutor

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


def test_a_prefix_cache_reset_reaches_every_replica(ray_server):
    """Both replicas cache a prompt (each one's second answer to it says so in ``usage``); one ``POST
    /reset_prefix_cache`` empties both, so each one's next answer computes it afresh."""
    prompt = " ".join(words() for _ in range(12))  # at least 24 tokens: a whole 16-token block

    def first_answer_of_each() -> dict[str, int]:
        """Each replica's cached prompt tokens in its first answer to ``prompt`` (the router picks the replica)."""
        seen: dict[str, int] = {}
        for _ in range(40):
            raw = ray_server.client.completions.with_raw_response.create(model="tiny", prompt=prompt, max_tokens=1)
            seen.setdefault(raw.headers[HEADER], raw.parse().usage.prompt_tokens_details.cached_tokens)
            if len(seen) == 2:
                return seen
        raise AssertionError("40 requests did not reach both replicas")

    first_answer_of_each()
    assert all(first_answer_of_each().values())
    assert post(ray_server.url + "/reset_prefix_cache", {})[0] == 200
    assert not any(first_answer_of_each().values())


def post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def running_on(server: RayServer) -> dict[str, float]:
    """The sequences each replica's engine runs, from the merged ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    status, _, body = get(server.url + "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    return {s.labels["replica"]: s.value for s in families["gpt2_triton:num_requests_running"].samples}


def long_request(prompts: int, stream: bool) -> dict:
    """Two sequences a prompt, 100 tokens each: seconds of work for a replica on half a core."""
    return {"model": "tiny", "prompt": [words() for _ in range(prompts)], "n": 2, "max_tokens": 100,
            "ignore_eos": True, "stream": stream}  # fmt: skip


def open_stream(server: RayServer) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, str]:
    """A long stream, once its first event came: ``(connection, response, replica)``."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(long_request(4, True)), {"Content-Type": "application/json"})
    stream = conn.getresponse()
    assert stream.status == 200 and stream.readline().startswith(b"data: ")
    return conn, stream, stream.getheader(HEADER)


def rest_of(conn: http.client.HTTPConnection, stream: http.client.HTTPResponse) -> list[str]:
    """The stream's remaining events (what came before a cut, if cut)."""
    try:
        raw = stream.read()
    except http.client.IncompleteRead as e:
        raw = e.partial
    conn.close()
    return [line[len(b"data: ") :].decode() for line in raw.splitlines() if line.startswith(b"data: ")]


def is_unavailable(error: dict) -> bool:
    """OpenAI's error object for a 503, with a message."""
    return error == {"error": {"message": error["error"]["message"], "type": "service_unavailable", "param": None,
                               "code": 503}} and bool(error["error"]["message"])  # fmt: skip


def test_a_killed_replica_is_replaced_and_the_other_keeps_serving(ray_server, reference):
    """Kill the replica running a whole completion and a stream: the completion gets 503 with OpenAI's error body
    and the stream ends with an error event and ``[DONE]`` (never a hang or a plain 500), streams on the other
    replica finish, the next requests are all answered right by it, and Serve replaces the dead replica."""
    import ray

    from engine.server.ray_serve import APP_NAME, DEPLOYMENT_NAME

    before = ray_server.replicas_serving(8)
    pool = ThreadPoolExecutor(1)
    whole = pool.submit(post, ray_server.url + "/v1/completions", long_request(8, False))
    pool.shutdown(wait=False)
    deadline = time.monotonic() + 30
    while not (busy := [replica for replica, n in running_on(ray_server).items() if n > 0]):
        assert time.monotonic() < deadline and not whole.done(), "the completion never ran"
        time.sleep(0.05)
    victim = busy[0]
    streams: dict[str, list] = {}
    while victim not in streams:  # Serve sends each to the replica with fewer requests: soon the victim
        assert sum(map(len, streams.values())) < 4, "no stream came to the replica running the completion"
        conn, stream, replica = open_stream(ray_server)
        streams.setdefault(replica, []).append((conn, stream))
    ray.init(address="auto", log_to_driver=False)
    try:
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#{victim}", namespace="serve"))
    finally:
        ray.shutdown()
    status, _, body = whole.result(timeout=120)
    assert status == 503 and is_unavailable(json.loads(body))
    for replica, opened in streams.items():
        for events in [rest_of(conn, stream) for conn, stream in opened]:
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            if replica == victim:  # cut short: 800 tokens outlast the kill
                assert is_unavailable(chunks[-1]) and not any("error" in c for c in chunks[:-1])
            else:
                assert sum(c["finish_reason"] == "length" for chunk in chunks for c in chunk["choices"]) == 8
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


class FakeReplicas:
    """Stands in for the engine replicas' handle: answers with ``batches`` of ASGI messages, then raises ``error``."""

    def __init__(self, batches: list[list[dict]], error: Exception) -> None:
        self.batches, self.error = batches, error

    def options(self, **_):
        return self

    def remote(self, scope: dict, body: bytes):
        async def answer():
            for batch in self.batches:
                yield batch
            raise self.error

        return answer()


def relayed(batches: list[list[dict]], error: Exception) -> list[dict]:
    """What a :class:`Relay` over failing replicas sends the client for one POST."""
    import asyncio

    from engine.server.ray_serve import Relay

    sent, body = [], json.dumps({"model": "tiny", "prompt": words()}).encode()
    incoming = [{"type": "http.request", "body": body[:7], "more_body": True},
                {"type": "http.request", "body": body[7:], "more_body": False}]  # fmt: skip

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b""}
    asyncio.run(Relay(FakeReplicas(batches, error), 1 << 20)(scope, receive, send))
    return sent


def test_a_replica_that_dies_before_answering_is_a_503_with_the_error_body():
    from ray.exceptions import ActorDiedError

    sent = relayed([], ActorDiedError())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 503
    assert is_unavailable(json.loads(b"".join(m.get("body", b"") for m in sent[1:])))


def test_a_replica_error_that_is_not_its_death_is_a_500_with_the_error_body():
    sent = relayed([], RuntimeError(words()))
    error = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]
    assert sent[0]["status"] == 500 and error["type"] == "server_error" and error["code"] == 500


def test_a_stream_whose_replica_dies_ends_with_an_error_event_and_done():
    from ray.exceptions import ActorDiedError

    start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    chunks = [{"type": "http.response.body", "body": f"data: {json.dumps(words())}\n\n".encode(), "more_body": True}
              for _ in range(random.randint(1, 5))]  # fmt: skip
    sent = relayed([[start, *chunks[:1]], chunks[1:]], ActorDiedError())
    assert sent[: 1 + len(chunks)] == [start, *chunks] and len(sent) == 2 + len(chunks)
    assert sent[-1]["more_body"] is False
    events = sent[-1]["body"].decode().split("\n\n")
    assert is_unavailable(json.loads(events[0].removeprefix("data: "))) and events[1:] == ["data: [DONE]", ""]


def test_an_answer_already_finished_is_left_as_it_is():
    from ray.exceptions import ActorDiedError

    whole = [{"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]},
             {"type": "http.response.body", "body": json.dumps(words()).encode(), "more_body": False}]  # fmt: skip
    assert relayed([whole], ActorDiedError()) == whole


def test_fronts_follow_the_engine_replicas_on_no_cpu_of_their_own():
    from engine.server.ray_serve import FRONT_NAME, ScaleOptions

    most = random.randint(2, 8)
    for scale in (ScaleOptions(num_replicas=most), ScaleOptions(min_replicas=1, max_replicas=most)):
        engines = scale.deployment_options({"CPU": 2.0}, 10.0, random.randint(1, 64), random.randint(1, 512))
        fronts = scale.front_options(engines)
        assert fronts["name"] == FRONT_NAME and fronts["ray_actor_options"] == {"num_cpus": 0}
        for key in ("num_replicas", "autoscaling_config", "max_ongoing_requests", "graceful_shutdown_timeout_s"):
            assert fronts.get(key) == engines.get(key)
