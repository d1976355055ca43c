"""Online serving benchmark against OpenAI-compatible servers (vLLM's ``vllm bench serve`` in shape).

    python bench/serve.py --compare                                # ours vs transformers serve (+ CB), gpt2, CPU
    python bench/serve.py --launch transformers-cb --sweep 0.5 1 2 inf
    python bench/serve.py --base-url http://127.0.0.1:8000 --request-rate 4 --goodput ttft:500 tpot:100
    python bench/serve.py --launch ours --prompts-file prompts.jsonl --max-concurrency 8 --save-requests
    python bench/serve.py --ray-replicas 1 2                       # ours on Ray Serve, 1 then 2 replicas
    python bench/serve.py --launch ours --ours-args "--lora-modules a=DIR_A b=DIR_B --max-loras 2" --lora-models a b

A client streams ``/v1/completions`` (SSE) for every request: TTFT is the time to the first chunk that carries text,
ITL every gap between such chunks, TPOT per request ``(e2e - TTFT) / (output tokens - 1)``, output tokens the
server's ``usage.completion_tokens`` (else the text chunks received). Requests arrive as a Poisson process at
``--request-rate`` (``inf``: all at once), optionally under ``--max-concurrency``; each is bounded by ``--timeout``
and a failed one is counted, never fatal. Servers are an already running ``--base-url``, or launched here
(``--launch ours|transformers|transformers-cb``) on 127.0.0.1 and a free port, on one checkpoint (a preset gets
transformers' random initialisation, written once with GPT-2's tokenizer files), and always stopped afterwards.
``--compare`` measures bench/throughput.py's offline figure for ours, then runs ours and both transformers servers on
the same workloads: saturation (rate inf), then a moderate rate; it prints ratios and the issue's goals as PASS / MISS
lines. Results go to JSON (and a PNG of latency against achieved output tokens/s for ``--sweep`` and ``--compare``).
The pieces live in ``bench/serving/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving import log  # noqa: E402 (bench/ is this script's directory, hence on sys.path)
from serving.checkpoint import context_len, prepare_checkpoint  # noqa: E402
from serving.compare import offline_figure  # noqa: E402
from serving.metrics import parse_goodput  # noqa: E402
from serving.report import banner, machine_info, report_results  # noqa: E402
from serving.runner import run_servers, servers_to_run, workloads_for  # noqa: E402
from serving.servers import SERVER_KINDS, TRANSFORMERS_KINDS  # noqa: E402
from serving.workload import load_tokenizer  # noqa: E402

# Default sizes: throughput.py's random scenario (32 prompts, input 64, output 48, range ratio 0.5), so ours' saturated
# rate compares with its offline figure; a default --compare takes about 5 minutes on 2 CPU cores with gpt2 in fp32.
DEFAULTS = dict(num_prompts=32, input_len=64, output_len=48, range_ratio=0.5)


def add_server_args(ap: argparse.ArgumentParser) -> None:
    where = ap.add_argument_group("servers (one of --base-url, --launch, --compare)")
    where.add_argument("--base-url", help="an OpenAI-compatible server already running, e.g. http://127.0.0.1:8000")
    where.add_argument("--model", help="the requests' model field (default: the first id its /v1/models lists)")
    where.add_argument("--launch", nargs="+", choices=SERVER_KINDS, help="start these servers here, one at a time")
    where.add_argument("--ray-replicas", nargs="+", type=int, metavar="N",
                       help="also launch ours on Ray Serve with N replicas (one server per N), and print each one's "
                       "saturated output tokens/s against the first's")  # fmt: skip
    where.add_argument("--compare", action="store_true",
                       help="ours, transformers-cb and transformers (or --launch's) on the same workloads: saturation "
                       "and a moderate rate, ratios, goals")  # fmt: skip
    launch = ap.add_argument_group("launched servers")
    launch.add_argument("--checkpoint", default="gpt2",
                        help="a preset (random weights, written once with tokenizer files) or a checkpoint directory "
                        "with vocab.json + merges.txt (default gpt2)")  # fmt: skip
    launch.add_argument("--checkpoint-dir", help="where to write the random checkpoint, kept (default: a temp dir)")
    launch.add_argument("--dtype", default="float32", help="every launched server's --dtype (default float32)")
    launch.add_argument("--device", default="cpu", help="every launched server's --device (default cpu)")
    launch.add_argument("--backend", help="ours' --backend")
    launch.add_argument("--max-num-seqs", type=int, help="ours' --max-num-seqs")
    launch.add_argument("--max-num-batched-tokens", type=int, help="ours' --max-num-batched-tokens")
    launch.add_argument("--ours-args", default="", help="more arguments for gpt2-triton serve (one string)")
    launch.add_argument("--transformers-args", default="", help="more arguments for transformers serve (one string)")
    launch.add_argument("--server-startup-timeout", type=float, default=300.0, help="seconds until /health answers")
    launch.add_argument("--server-log-dir", help="keep the servers' logs here (default: a temp dir)")


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    data = ap.add_argument_group("workload")
    data.add_argument("--num-prompts", type=int, help=f"default {DEFAULTS['num_prompts']} (prompts file: all)")
    data.add_argument("--input-len", type=int, default=DEFAULTS["input_len"], help="mean prompt tokens")
    data.add_argument("--output-len", type=int, default=DEFAULTS["output_len"], help="mean max_tokens")
    data.add_argument("--range-ratio", type=float, default=DEFAULTS["range_ratio"],
                      help="lengths uniform in len*(1-r)..len*(1+r)")  # fmt: skip
    data.add_argument("--prompts-file", help="one prompt per line: text, or JSON with prompt [and output_len]")
    data.add_argument("--tokenizer", help="GPT-2 tokenizer: a directory with vocab.json + merges.txt or a .tiktoken")
    data.add_argument("--max-model-len", type=int, help="refuse longer requests (default: the checkpoint's, or 1024)")
    data.add_argument("--seed", type=int, default=0)
    req = ap.add_argument_group("requests")
    req.add_argument("--prompt-format", choices=["auto", "ids", "text"], default="auto",
                     help="auto: token ids, except text for transformers serve (which refuses ids)")  # fmt: skip
    req.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                     help="every completion runs to max_tokens (vLLM's ignore_eos + min_tokens)")  # fmt: skip
    req.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request body")
    req.add_argument("--lora-models", nargs="+", metavar="NAME",
                     help="request i's model: the i-th of these, round robin (LoRA adapters the server serves, "
                     "ours given --ours-args '--lora-modules NAME=DIR ...'; the base model may be one)")  # fmt: skip
    req.add_argument("--timeout", type=float, default=300.0, help="seconds each request may take")
    req.add_argument("--num-warmups", type=int, default=1, help="untimed requests before the runs")
    req.add_argument("--reset-prefix-cache", action="store_true",
                     help="POST /reset_prefix_cache before each run (ours, vLLM): a cold cache even for prompts an "
                     "earlier invocation sent to a --base-url server")  # fmt: skip


def add_load_and_result_args(ap: argparse.ArgumentParser) -> None:
    load = ap.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (inf: all at once)")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    load.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    load.add_argument("--sweep", nargs="+", type=float, metavar="RATE", help="one run per rate, and a plot")
    load.add_argument("--moderate-rate", type=float, help="--compare's moderate rate (default: --moderate-fraction)")
    load.add_argument("--moderate-fraction", type=float, default=0.5,
                      help="moderate rate = this x transformers-cb's saturated req/s (default 0.5)")  # fmt: skip
    load.add_argument("--moderate-num-prompts", type=int, default=16, help="requests of --compare's moderate run")
    out = ap.add_argument_group("results")
    out.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000")
    out.add_argument("--percentiles", nargs="+", type=float, default=[99.0], help="reported besides mean and median")
    out.add_argument("--save-requests", action="store_true", help="per-request rows in the JSON")
    out.add_argument("--offline", metavar="run|none|JSON",
                     help="--compare's offline figure: run bench/throughput.py here first (default), none, or its "
                     "JSON from an earlier run")  # fmt: skip
    out.add_argument("--output-json", help="default: bench/results/serve_<cpu>_<date>.json")
    out.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="PNG for --sweep/--compare")


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse contradictory or impossible settings before anything starts."""
    launching = (args.launch or args.ray_replicas) and not args.compare
    if sum(map(bool, (args.base_url, launching, args.compare))) != 1:
        ap.error("give one of --base-url URL, --launch KIND [KIND ...] / --ray-replicas N [N ...], --compare")
    if args.ray_replicas and min(args.ray_replicas) < 1:
        ap.error("--ray-replicas counts must be at least 1")
    if args.compare and args.sweep:
        ap.error("--compare runs saturation and a moderate rate; --sweep is for --base-url or --launch")
    if args.offline and not args.compare:
        ap.error("--offline is --compare's")
    if args.offline not in (None, "run", "none") and not os.path.isfile(args.offline):
        ap.error(f"--offline {args.offline}: not run, none, or a file")
    kinds = set(args.launch or []) | (set(SERVER_KINDS) if args.compare and not args.launch else set())
    if args.prompt_format == "ids" and kinds & set(TRANSFORMERS_KINDS):
        ap.error("--prompt-format ids: transformers serve takes text prompts only (it answers 400 to token ids)")
    for name in ("num_prompts", "input_len", "output_len", "moderate_num_prompts"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.range_ratio < 1:
        ap.error("--range-ratio must be in [0, 1)")
    rates = (args.sweep or []) + [args.request_rate] + ([args.moderate_rate] if args.moderate_rate else [])
    if any(not r > 0 for r in rates) or args.burstiness <= 0:
        ap.error("request rates and --burstiness must be positive")
    if not isinstance(args.extra_body, dict):
        ap.error("--extra-body must be a JSON object")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(ap)
    add_workload_args(ap)
    add_load_and_result_args(ap)
    args = ap.parse_args(argv)
    check_args(ap, args)
    if args.num_prompts is None and not args.prompts_file:
        args.num_prompts = DEFAULTS["num_prompts"]
    args.goodput = parse_goodput(args.goodput)
    return args


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the finally blocks that stop the servers


def prepare(args, tmp: Path) -> tuple[Path | None, Path, dict]:
    """(the checkpoint launched servers load, where their logs go, the workload of each run)."""
    checkpoint = None
    if not args.base_url:
        checkpoint = prepare_checkpoint(args.checkpoint, args.checkpoint_dir, args.seed, tmp)
    log_dir = Path(args.server_log_dir or tmp)
    log_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.tokenizer or (str(checkpoint) if checkpoint else None))
    max_model_len = args.max_model_len or (context_len(checkpoint) if checkpoint else 1024)
    return checkpoint, log_dir, workloads_for(args, tokenizer, max_model_len)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    print(banner(machine))
    previous = signal.signal(signal.SIGTERM, _terminate)
    servers, runs, workloads, (offline, offline_missing) = [], [], {}, (None, "not measured")
    interrupted = False
    try:
        with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
            checkpoint, log_dir, workloads = prepare(args, Path(tmp))
            servers = servers_to_run(args, checkpoint, log_dir, workloads)
            if args.compare:
                offline, offline_missing = offline_figure(args, checkpoint, log_dir, [s.name for s in servers])
            run_servers(servers, workloads, args, runs)
    except KeyboardInterrupt:
        log("interrupted: the servers are stopped; reporting what finished")
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    report_results(args, machine, servers, runs, workloads, offline, offline_missing)
    return 130 if interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
