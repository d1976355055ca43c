"""Data-parallel replicas on Ray Serve (``pip install -e ".[ray]"``): one :class:`AsyncLLM` per replica, each behind
the same OpenAI-compatible app as ``gpt2-triton serve``, Serve's proxy routing requests among them.

    gpt2-triton serve ./gpt2-medium --replicas 4                    # a local Ray instance, 4 replicas
    gpt2-triton serve ./gpt2-medium --ray-address auto --min-replicas 1 --max-replicas 8   # join a cluster, autoscale

A replica takes one GPU (``num_gpus=1``) on a GPU cluster, else a share of the CPUs. Serve's health check asks the
replica whether its engine thread still runs; a replica that fails it, or whose process dies, is replaced by Serve.
Every response names its replica in the ``x-gpt2-triton-replica`` header, ``GET /metrics`` answers for every
replica at once, each sample labelled ``replica="..."``, and ``POST /reset_prefix_cache`` resets every replica's.

Serve's proxy routes each request to a :class:`Front` (as many as engine replicas, no CPUs of their own), which hands
it to an engine replica through a deployment handle and relays its answer. The front is there for one thing: a
replica that dies under a request. Ray's proxy would answer a whole completion with its own plain-text 500 and cut a
stream; the front answers 503 with OpenAI's error body, or ends a stream already under way with an error event and
``data: [DONE]``. Requests not yet sent to a replica are routed to a live one by Serve.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import ray
import uvicorn
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from uvicorn.lifespan.on import LifespanOn

from engine.server import ServeOptions, bind, build, serving
from engine.server.app import error_response
from engine.server.metrics import Metrics, merge_expositions
from engine.server.protocol import error_body

logger = logging.getLogger("gpt2_triton.server")
APP_NAME = "gpt2-triton"
DEPLOYMENT_NAME = "GPT2TritonReplica"
FRONT_NAME = "GPT2TritonFront"
UNAVAILABLE = (RayActorError, BackPressureError, DeploymentUnavailableError)  # no live replica to answer: 503
REPLICA_HEADER = b"x-gpt2-triton-replica"
BROADCAST_TIMEOUT_S = 10.0  # a call on every replica (metrics, a prefix-cache reset)
DEFAULT_MAX_NUM_SEQS = 256  # LLMEngine's default


@dataclass
class ScaleOptions:
    """How many replicas and what each takes; autoscaling when ``min_replicas`` / ``max_replicas`` are set."""

    num_replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    num_gpus: float | None = None  # per replica; None: 1 if the cluster has GPUs, else 0
    num_cpus: float | None = None  # per replica; None: 1 with a GPU, else the cluster's CPUs shared out
    health_check_period_s: float = 5.0

    def deployment_options(self, cluster: dict[str, float], grace_s: float, max_num_seqs: int,
                           max_waiting: int) -> dict:  # fmt: skip
        """Serve's options for the engine replicas. A replica takes as many requests as its engine runs plus its
        waiting queue (Serve's default of 5 would starve continuous batching); autoscaling aims at a full batch per
        replica."""
        gpus = self.num_gpus if self.num_gpus is not None else (1.0 if cluster.get("GPU", 0) > 0 else 0.0)
        most = self.max_replicas or self.num_replicas
        cpus = self.num_cpus if self.num_cpus is not None else (1.0 if gpus else cluster.get("CPU", 1) / most)
        options = dict(
            name=DEPLOYMENT_NAME,
            ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
            max_ongoing_requests=max_num_seqs + max_waiting,
            health_check_period_s=self.health_check_period_s,
            graceful_shutdown_timeout_s=grace_s + 5,
        )
        if self.min_replicas is None and self.max_replicas is None:
            return {**options, "num_replicas": self.num_replicas}
        target = self.target_ongoing_requests if self.target_ongoing_requests is not None else max_num_seqs
        autoscaling = {"min_replicas": self.min_replicas or 1, "max_replicas": most, "target_ongoing_requests": target}
        return {**options, "autoscaling_config": autoscaling}

    def front_options(self, engine_options: dict) -> dict:
        """The fronts: as many as engine replicas (the same count, or the same autoscaling), taking what the engines
        take at once, on no CPU of their own (they only relay)."""
        keep = ("max_ongoing_requests", "graceful_shutdown_timeout_s", "num_replicas", "autoscaling_config")
        return {**{k: v for k, v in engine_options.items() if k in keep}, "name": FRONT_NAME,
                "ray_actor_options": {"num_cpus": 0}}  # fmt: skip


class ReplicaHeader:
    """ASGI middleware: every HTTP response carries the replica's id."""

    def __init__(self, app, replica_id: str) -> None:
        self.app = app
        self.value = replica_id.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.value)]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class EngineReplica:
    """One Serve replica: an engine and the app over it, serving the requests its fronts relay (made a deployment by
    :func:`application`). Serve's ``__del__`` on shutdown runs the app's lifespan end (drain, then stop)."""

    async def __init__(self, options: ServeOptions, engine_args: dict) -> None:
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        app, self.llm = build(options, engine_args, self.all_replicas_metrics, self.reset_every_prefix_cache)
        self.metrics: Metrics = app.metrics
        self.asgi_app = ReplicaHeader(app, self.replica_id)
        self.lifespan = LifespanOn(uvicorn.Config(app, lifespan="on", log_level=None, log_config=None))
        await self.lifespan.startup()

    async def __del__(self) -> None:
        await self.lifespan.shutdown()

    async def check_health(self) -> None:
        """Serve's health check: the engine thread must still be stepping."""
        if not self.llm.is_running:
            raise RuntimeError(f"replica {self.replica_id}: the engine thread has stopped")

    async def http(self, scope: dict, body: bytes) -> AsyncIterator[list[dict]]:
        """One HTTP request relayed by a :class:`Front` (``body`` read whole): the app's ASGI messages, in batches
        as they come. The request ends with the front's call: Serve cancels this generator when it goes."""
        sent: asyncio.Queue[dict | None] = asyncio.Queue()
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if delivered:
                await asyncio.Future()  # no more messages: the front's cancellation ends the request
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def run() -> None:
            try:
                await self.asgi_app(scope, receive, sent.put)
            finally:
                sent.put_nowait(None)

        task = asyncio.ensure_future(run())
        try:
            while (message := await sent.get()) is not None:
                batch = [message]
                while not sent.empty() and (message := sent.get_nowait()) is not None:
                    batch.append(message)
                yield batch
                if message is None:
                    break
            await task  # the app's own exception, if any
        finally:
            task.cancel()

    def replica_metrics(self) -> tuple[str, bytes]:
        return self.replica_id, self.metrics.render()

    async def all_replicas_metrics(self) -> bytes:
        return merge_expositions(dict(await self._broadcast("replica_metrics")))

    async def reset_own_prefix_cache(self) -> bool:
        return await self.llm.reset_prefix_cache()

    async def reset_every_prefix_cache(self) -> bool:
        """``POST /reset_prefix_cache`` on any replica resets them all; False if one was busy (the idle ones are
        reset)."""
        return all(await self._broadcast("reset_own_prefix_cache"))

    @staticmethod
    async def _broadcast(method: str) -> list:
        """``method``'s result on every replica (Serve's broadcast, made for control calls such as cache resets)."""
        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
        return await handle.broadcast(method).results_async(timeout_s=BROADCAST_TIMEOUT_S)


class Relay:
    """ASGI app of a :class:`Front`: each HTTP request goes to an engine replica through ``replicas`` and its
    messages come back; when the replica fails first, the client gets OpenAI's error body (see :meth:`fail`)."""

    def __init__(self, replicas: DeploymentHandle, max_body_bytes: int) -> None:
        self.replicas = replicas.options(method_name="http", stream=True)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        if scope["type"] != "http":
            return
        body = await read_body(receive, self.max_body_bytes + 1)  # over the limit: the replica answers 413
        if body is None:
            return  # the client left while sending
        state = {"started": False, "sse": False, "finished": False}
        response = self.replicas.remote(relayed_scope(scope), body)
        try:
            async for batch in response:
                for message in batch:
                    note(state, message)
                    await send(message)
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as e:  # noqa: BLE001 (whatever ended the call, the client gets an answer)
            await self.fail(e, state, scope, receive, send)

    @staticmethod
    async def fail(e: Exception, state: dict, scope, receive, send) -> None:
        """Before the response started: 503 (the replica died, or none is up) or 500 with OpenAI's error body. In a
        stream: an error event and ``[DONE]``. In any other body already under way: cut (re-raised)."""
        status = 503 if isinstance(e, UNAVAILABLE) else 500
        kind = "service_unavailable" if status == 503 else "server_error"
        message = "the replica serving this request failed; retry it" if status == 503 else f"replica error: {e}"
        logger.warning("request to %s failed: %s", scope.get("path"), e)
        if not state["started"]:
            return await error_response(status, message, kind)(scope, receive, send)
        if state["finished"]:
            return
        if not state["sse"]:
            raise e
        event = serving.sse(error_body(message, kind, None, status)) + serving.sse("[DONE]")
        await send({"type": "http.response.body", "body": event.encode(), "more_body": False})


def note(state: dict, message: dict) -> None:
    """Track a response through its ASGI messages: started, a stream of events, finished."""
    if message["type"] == "http.response.start":
        headers = dict(message.get("headers", []))
        state["started"] = True
        state["sse"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
    elif message["type"] == "http.response.body" and not message.get("more_body", False):
        state["finished"] = True


def relayed_scope(scope: dict) -> dict:
    """The parts of an HTTP scope the app reads, all plain data."""
    keys = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string",
            "headers", "client", "server")  # fmt: skip
    return {k: scope[k] for k in keys if k in scope}


async def read_body(receive, most: int) -> bytes | None:
    """The request body, up to ``most`` bytes; None if the client disconnects first."""
    body, more = b"", True
    while more and len(body) < most:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body[:most]


async def lifespan(receive, send) -> None:
    """ASGI lifespan with nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            return await send({"type": "lifespan.shutdown.complete"})


class Front:
    """The application's ingress: relays each request to an engine replica (made a deployment by
    :func:`application`)."""

    def __init__(self, replicas: DeploymentHandle, max_body_bytes: int) -> None:
        self.relay = Relay(replicas, max_body_bytes)

    def __serve_build_asgi_app__(self):
        return self.relay


def application(options: ServeOptions, engine_args: dict, scale: ScaleOptions, cluster: dict[str, float]):
    """The Serve application: fronts as its ingress, over the engine replicas, bound to their arguments."""
    max_num_seqs = engine_args.get("max_num_seqs", DEFAULT_MAX_NUM_SEQS)
    chosen = scale.deployment_options(cluster, options.shutdown_grace_s, max_num_seqs, options.max_waiting)
    replicas = serve.deployment(EngineReplica).options(**chosen).bind(options, engine_args)
    front = serve.deployment(serve.ingress()(Front)).options(**scale.front_options(chosen))
    return front.bind(replicas, options.max_body_bytes)


def serve_on_ray(options: ServeOptions, engine_args: dict, scale: ScaleOptions, ray_address: str | None) -> int:
    """Run the replicas until SIGTERM / SIGINT, then delete them (and stop Ray when it was started here)."""
    bind(options.host, options.port).close()  # a port in use is the user's mistake: say so before starting Ray
    started_ray = ray_address is None
    ray.init(address=ray_address, include_dashboard=False, log_to_driver=True)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        serve.run(application(options, engine_args, scale, ray.cluster_resources()), name=APP_NAME, route_prefix="/")
        print(f"serving {APP_NAME} on http://{options.host}:{options.port} with Ray Serve", flush=True)
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        serve.delete(APP_NAME)
        if started_ray:
            serve.shutdown()
            ray.shutdown()
    return 0
