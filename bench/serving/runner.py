"""Which runs each server gets (a rate, a sweep, or --compare's saturation then moderate rate), on which prompts,
and the loop that starts each server, runs them and stops it."""

from __future__ import annotations

import asyncio
import math
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from . import log
from .client import run_load, warm_up
from .metrics import summarize
from .servers import (
    TRANSFORMERS_KINDS,
    TRANSFORMERS_LIMITS,
    Server,
    cb_blocks_for,
    discover_model,
    launched,
    launched_server,
    ray_server,
    reset_prefix_cache,
)
from .workload import Workload, file_workload, random_workload

# --compare's order: the peer whose saturated request rate sets the moderate rate runs first.
COMPARE_ORDER = ("transformers-cb", "ours", "transformers")
REFERENCE_PEER = "transformers-cb"


@dataclass
class Run:
    """One workload sent to one server at one rate."""

    server: str
    label: str  # "rate inf", "saturation", "moderate", ...
    rate: float
    workload: dict
    summary: dict | None = None
    peak_in_flight: int | None = None
    error: str | None = None  # why it did not run
    requests: list[dict] | None = None  # --save-requests

    def as_dict(self) -> dict:
        return {**asdict(self), "rate": rate_str(self.rate)}


def rate_str(rate: float) -> str | float:
    return "inf" if math.isinf(rate) else rate


def plan(args) -> list[tuple[str, float | None]]:
    """(label, rate) of each run on every server; a rate of None is --compare's moderate rate, set once known."""
    if args.compare:
        return [("saturation", math.inf), ("moderate", None)]
    return [(f"rate {rate_str(r)}", r) for r in (args.sweep or [args.request_rate])]


def workloads_for(args, tokenizer, max_model_len: int) -> dict[str, Workload]:
    """One workload per run label, each from its own seed: a server never sees a prompt twice (ours' prefix cache
    would serve a repeated one), and every server gets the same prompts for the same run."""
    out = {}
    for k, (label, _) in enumerate(plan(args)):
        n = args.moderate_num_prompts if label == "moderate" else args.num_prompts
        if args.prompts_file:
            w = file_workload(tokenizer, args.prompts_file, n, args.output_len, args.seed + k)
        else:
            w = random_workload(tokenizer, n, args.input_len, args.output_len, args.range_ratio, args.seed + k)
        if w.longest_request() > max_model_len:
            raise SystemExit(f"a request needs {w.longest_request()} positions (prompt + output); the model has "
                             f"{max_model_len} (--max-model-len)")  # fmt: skip
        out[label] = w
    if args.num_warmups:
        out["warmup"] = random_workload(tokenizer, args.num_warmups, args.input_len, min(args.output_len, 16), 0.0,
                                        args.seed + 1000)  # fmt: skip
    return out


def servers_to_run(args, checkpoint: Path | None, log_dir: Path, workloads: dict[str, Workload]) -> list[Server]:
    """The --base-url server, or one server per --launch kind (--compare: all three, in COMPARE_ORDER)."""
    if args.base_url:
        fmt = "ids" if args.prompt_format == "auto" else args.prompt_format
        return [Server(args.base_url, "url", args.base_url.rstrip("/"), args.model, fmt)]
    kinds = args.launch or ([] if args.ray_replicas and not args.compare else list(COMPARE_ORDER))
    if args.compare:
        kinds = sorted(kinds, key=COMPARE_ORDER.index)
    in_flight = max(len(w) for w in workloads.values())
    if args.max_concurrency:
        in_flight = min(in_flight, args.max_concurrency)
    cb_blocks = cb_blocks_for(in_flight, max(w.longest_request() for w in workloads.values()))
    servers = [launched_server(kind, checkpoint, log_dir, args, cb_blocks) for kind in kinds]
    return servers + [ray_server(n, checkpoint, log_dir, args) for n in args.ray_replicas or ()]


def moderate_rate(runs: list[Run], args) -> tuple[float | None, str]:
    """--moderate-rate, else --moderate-fraction of the reference peer's saturated request throughput (the first
    server's when that peer is not in the run)."""
    if args.moderate_rate is not None:
        return args.moderate_rate, "--moderate-rate"
    sat = [r for r in runs if r.label == "saturation" and r.summary and r.summary["completed"]]
    ref = next((r for r in sat if r.server == REFERENCE_PEER), sat[0] if sat else None)
    if ref is None:
        return None, "no saturation run completed"
    req_s = ref.summary["request_throughput"]
    return args.moderate_fraction * req_s, f"{args.moderate_fraction:g} x {ref.server}'s saturated {req_s:.3f} req/s"


def execute_run(server: Server, w: Workload, label: str, rate: float, args, arrival_seed: int) -> Run:
    log(f"[{server.name}] {label}: {len(w)} requests at rate {rate_str(rate)} req/s")
    run = Run(server.name, label, rate, w.describe())
    results, duration, run.peak_in_flight = asyncio.run(run_load(server, w, rate, args, arrival_seed))
    run.summary = s = summarize(results, duration, args.percentiles, args.goodput)
    if args.save_requests:
        run.requests = [r.row() for r in results]
    ttft = s["ttft_ms"]["median"]
    errors = f"; errors: {s['errors']}" if s["errors"] else ""
    log(
        f"[{server.name}] {label}: {s['completed']} ok, {s['failed']} failed in {duration:.1f} s, "
        f"{s['output_throughput']:.1f} output tok/s, median TTFT {'-' if ttft is None else f'{ttft:.0f}'} ms{errors}"
    )
    return run


def benchmark_server(server: Server, workloads: dict[str, Workload], runs: list[Run], args) -> None:
    """Warm-up, then each planned run on a server that answers; appends to ``runs``."""
    if server.model is None:
        server.model = discover_model(server.base_url)
    if args.num_warmups:
        server.warmup = asyncio.run(warm_up(server, workloads["warmup"], args))
        if not server.warmup["ok"]:
            hint = f" ({TRANSFORMERS_LIMITS})" if server.kind in TRANSFORMERS_KINDS else ""
            raise RuntimeError(f"warm-up request failed: {server.warmup['errors'][0]}{hint}")
    for k, (label, rate) in enumerate(plan(args)):
        if rate is None:
            rate, why = moderate_rate(runs, args)
            if rate is None:
                runs.append(Run(server.name, label, math.nan, workloads[label].describe(), error=why))
                continue
            log(f"[{server.name}] moderate rate {rate:.3f} req/s: {why}")
        if args.reset_prefix_cache:
            log(f"[{server.name}] {reset_prefix_cache(server)}")
        # the same arrival times on every server for the same run
        runs.append(execute_run(server, workloads[label], label, rate, args, arrival_seed=args.seed + k))


def run_servers(servers: list[Server], workloads: dict[str, Workload], args, runs: list[Run]) -> None:
    """Every server in turn, appending to ``runs`` (kept on an interrupt): launched ones are started, benchmarked and
    stopped; one that fails to start or to answer its warm-up gets ``error``, and the others still run."""
    for server in servers:
        try:
            if server.command is None:
                benchmark_server(server, workloads, runs, args)
                continue
            log(f"[{server.name}] starting: {shlex.join(server.command)}")
            with launched(server, args.server_startup_timeout, grace_s=15.0):
                log(f"[{server.name}] answering at {server.base_url} after {server.startup_s:.1f} s")
                benchmark_server(server, workloads, runs, args)
        except RuntimeError as e:
            server.error = str(e)
            log(f"[{server.name}] FAILED: {e}")
