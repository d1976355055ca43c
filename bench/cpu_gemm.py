"""The torch backend's CPU GEMM against PyTorch's own, on a GPT-2 preset's four block linears, as GFLOP/s and ratios.

    python bench/cpu_gemm.py                                   # gpt2, fp32, M = 1 8 32 256 2048, 2 threads
    python bench/cpu_gemm.py --model-size gpt2-medium --dtypes float32 float16 bfloat16 --m 1 8 32

For each weight dtype and M: ours is ``GemmWeight`` (packed strips, oneDNN off, fp32 activations: what the engine
runs for a float model's block linears); the peer is ``torch.nn.functional.linear`` with activations and weight in
that dtype (MKL for fp32; for 16-bit whatever PyTorch's CPU build picks, oneDNN where the CPU has the instructions).
Both are first checked against float64 (relative error under the dtype's bound), then timed in turns, ``--rounds``
times, each time the best of a loop of about ``--ms`` milliseconds; the table shows each side's best and the ratio
ours / peer of GFLOP/s (above 1: we are faster). The JSON (machine, versions, commit, every round) goes to
bench/results/. The loop calls one weight again and again, so at M = 1 both sides read it from cache; decode reads
every weight from memory, which bench/cpu_decode.py measures.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.llamacpp.machine import machine_info, slug  # noqa: E402
from engine import cpu_kernels  # noqa: E402
from engine.config import PRESETS  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOLERANCE = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 2e-2}  # relative to the largest |output|
RESULTS = ROOT / "bench" / "results"


def block_shapes(preset: str) -> dict[str, tuple[int, int]]:
    """The four block linears of a preset as ``name -> (N, K)``."""
    d = PRESETS[preset]["n_embd"]
    return {"qkv": (3 * d, d), "attn_out": (d, d), "mlp_in": (4 * d, d), "mlp_out": (d, 4 * d)}


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest |error| over the largest |output|: stricter than the norm ratio of bench/harness.py's ``rel_err``
    (and of the tests'), which an error in a few outputs moves little."""
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def best_seconds(fn, ms: float) -> float:
    """The fastest call of ``fn`` in a loop of about ``ms`` milliseconds (at least three calls)."""
    fn()
    best, deadline, calls = float("inf"), time.perf_counter() + ms / 1e3, 0
    while calls < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        calls += 1
    return best


def measure(dtype: str, m: int, shapes: dict[str, tuple[int, int]], rounds: int, ms: float) -> dict:
    """Ours and the peer on every shape at ``m`` rows: their summed best times (one per round) and checks."""
    dt = DTYPES[dtype]
    calls, checks = {"ours": [], "torch": []}, {}
    for name, (n, k) in shapes.items():
        w = (torch.randn(n, k) * 0.02).to(dt)
        x = torch.randn(m, k)
        x_peer = x.to(dt)
        ours = functools.partial(cpu_kernels.GemmWeight(w, onednn=False).linear, x)
        peer = functools.partial(torch.nn.functional.linear, x_peer, w)
        ref = x_peer.double() @ w.double().t()  # the inputs as the peer sees them; ours' fp32 x is closer still
        checks[name] = {"ours": max_rel_err(ours(), ref), "torch": max_rel_err(peer(), ref)}
        calls["ours"].append(ours)
        calls["torch"].append(peer)
    ok = all(e <= TOLERANCE[dtype] for errors in checks.values() for e in errors.values())
    times = {side: [] for side in calls}
    for _ in range(rounds):
        for side, fns in calls.items():
            times[side].append(sum(best_seconds(fn, ms) for fn in fns))
    flops = sum(2 * m * n * k for n, k in shapes.values())
    return dict(dtype=dtype, m=m, flops=flops, ok=ok, rel_err=checks, seconds=times)


def gflops(row: dict, side: str) -> float:
    return row["flops"] / min(row["seconds"][side]) / 1e9


def table(rows: list[dict]) -> str:
    lines = ["dtype     M      ours GFLOP/s  torch GFLOP/s  ours/torch  check"]
    for r in rows:
        ours, peer = gflops(r, "ours"), gflops(r, "torch")
        lines.append(
            f"{r['dtype']:<9} {r['m']:<6} {ours:>12.1f} {peer:>14.1f} {ours / peer:>10.2f}x  "
            f"{'ok' if r['ok'] else 'FAILED: ' + json.dumps(r['rel_err'])}"
        )
    return "\n".join(lines)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr and exit 2, as the CLI's errors (no usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-size", default="gpt2", choices=list(PRESETS), help="the preset whose shapes to run")
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=list(DTYPES), help="weight dtypes")
    ap.add_argument("--m", nargs="+", type=int, default=[1, 8, 32, 256, 2048], help="activation rows")
    ap.add_argument("--threads", type=int, default=2, help="torch's threads, which both sides run on")
    ap.add_argument("--rounds", type=int, default=3, help="turns of ours then the peer")
    ap.add_argument("--ms", type=float, default=200.0, help="milliseconds of calls per shape, side and round")
    ap.add_argument("--output-json", type=Path, help="default: bench/results/cpu_gemm_<cpu>_<date>.json")
    args = ap.parse_args(argv)
    for name in ("threads", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if min(args.m) < 1 or args.ms <= 0:
        ap.error("--m and --ms must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if not cpu_kernels.available():
        print("error: the CPU kernels do not run here (x86-64 with AVX2 and a C++ compiler)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    machine = machine_info()
    shapes = block_shapes(args.model_size)
    print(f"CPU GEMM, {args.model_size}'s block linears {list(shapes.values())} (N, K); {machine['cpu']}, "
          f"{args.threads} threads, {cpu_kernels.chosen_isa()} build; torch {torch.__version__}; best of "
          f"{args.rounds} rounds", flush=True)  # fmt: skip
    rows = [measure(dtype, m, shapes, args.rounds, args.ms) for dtype in args.dtypes for m in args.m]
    print(table(rows))
    path = args.output_json or RESULTS / f"cpu_gemm_{slug(machine['cpu'])}_{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = dict(model=args.model_size, shapes=shapes, threads=args.threads, rounds=args.rounds, ms=args.ms,
                    isa=cpu_kernels.chosen_isa())  # fmt: skip
    path.write_text(json.dumps(dict(machine=machine, settings=settings, rows=rows), indent=2) + "\n")
    print(f"JSON: {path}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
