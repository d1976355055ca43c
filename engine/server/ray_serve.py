"""Data-parallel replicas on Ray Serve (``pip install -e ".[ray]"``): one :class:`AsyncLLM` per replica, each behind
the same OpenAI-compatible app as ``gpt2-triton serve``, Serve's proxy routing requests among them.

    gpt2-triton serve ./gpt2-medium --replicas 4                    # a local Ray instance, 4 replicas
    gpt2-triton serve ./gpt2-medium --ray-address auto --min-replicas 1 --max-replicas 8   # join a cluster, autoscale

A replica takes one GPU (``num_gpus=1``) on a GPU cluster, else a share of the CPUs. Serve's health check asks the
replica whether its engine thread still runs; a replica that fails it, or whose process dies, is replaced by Serve.
Every response names its replica in the ``x-gpt2-triton-replica`` header, and ``GET /metrics`` answers for every
replica at once, each sample labelled ``replica="..."``.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass

import ray
from ray import serve

from engine.server import ServeOptions, bind, build
from engine.server.metrics import Metrics, merge_expositions

APP_NAME = "gpt2-triton"
DEPLOYMENT_NAME = "GPT2TritonReplica"
REPLICA_HEADER = b"x-gpt2-triton-replica"
METRICS_TIMEOUT_S = 10.0
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
        """Serve's options. A replica takes as many requests as its engine runs plus its waiting queue (Serve's
        default of 5 would starve continuous batching); autoscaling aims at a full batch per replica."""
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
    """One Serve replica: an engine and the app over it (made a deployment by :func:`application`)."""

    def __init__(self, options: ServeOptions, engine_args: dict) -> None:
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        app, self.llm = build(options, engine_args, exposition=self.all_replicas_metrics)
        self.metrics: Metrics = app.metrics
        self.asgi_app = ReplicaHeader(app, self.replica_id)

    def __serve_build_asgi_app__(self):
        return self.asgi_app

    async def check_health(self) -> None:
        """Serve's health check: the engine thread must still be stepping."""
        if not self.llm.is_running:
            raise RuntimeError(f"replica {self.replica_id}: the engine thread has stopped")

    def replica_metrics(self) -> tuple[str, bytes]:
        return self.replica_id, self.metrics.render()

    async def all_replicas_metrics(self) -> bytes:
        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
        results = await handle.broadcast("replica_metrics").results_async(timeout_s=METRICS_TIMEOUT_S)
        return merge_expositions(dict(results))


def application(options: ServeOptions, engine_args: dict, scale: ScaleOptions, cluster: dict[str, float]):
    """The Serve application: the replica class as an ingress deployment, bound to its arguments."""
    deployment = serve.deployment(serve.ingress()(EngineReplica))
    max_num_seqs = engine_args.get("max_num_seqs", DEFAULT_MAX_NUM_SEQS)
    chosen = scale.deployment_options(cluster, options.shutdown_grace_s, max_num_seqs, options.max_waiting)
    return deployment.options(**chosen).bind(options, engine_args)


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
