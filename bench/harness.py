"""The shared harness of the kernel benchmarks: validate, time, compare with the roofline, write rows.

A benchmark is a list of :class:`Case` s. A case's ``setup()`` builds its operands once and returns a
:class:`Setup`: per provider (``triton``: our kernel; ``torch``: its eager PyTorch peer, cuBLAS / SDPA / torch's
LayerNorm; ``torch.compile``: inductor's code for torch code) one call over those operands, and the reference
output (float32 or float64) every call is checked against. :func:`measure` then

1. validates every provider (``‖out − ref‖ / ‖ref‖`` within the dtype's tolerance): a provider that fails is
   recorded with its error and not timed;
2. times the others the same way. When any of them runs under ``GRAPH_BELOW_MS`` on the device (its device time
   alone, the host's launch time excluded: :func:`device_ms`), all are timed as CUDA-graph replays (launch
   overhead hidden) that cycle through copies of the big operands (~``ROTATE_BYTES`` in all, over 4x an H200's
   L2), so every call reads its operands from device memory, as a decode step does; otherwise as
   ``triton.testing.do_bench`` medians (L2 flushed before each call);
3. puts each time against the case's roofline: the larger of bytes / copy bandwidth and flops / matmul rate, both
   ceilings measured in the same run (:func:`measure_ceilings`).

:func:`csv_rows` turns a result into one row per provider, with the environment (GPU, versions, date, commit);
:func:`append_rows` appends them to a CSV (``bench/plot.py`` draws it) or JSON-lines file. :func:`main` is the
command line every script in ``bench/kernels/`` shares. A dry run (``--dry-run``) runs the same code on the CPU
under the Triton interpreter with tiny sizes and wall-clock timings: it proves the code paths and the validations,
not speed.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OURS = "triton"
PEERS = ("torch", "torch.compile")  # every script's peers; some add their own (e.g. torch-paged)
DTYPES = ("float16", "bfloat16")
TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}  # relative-norm error vs the float32/64 reference
GRAPH_BELOW_MS = 0.1  # cases with a call shorter than this on the device are timed as CUDA-graph replays
PROBE_SPIN_CYCLES = 2_000_000  # GPU spin queued before each probed call: 1-2 ms, over any launcher's host time
PROBE_REPS = 3
GRAPH_REP_MS = 10  # GPU time per graph replay; capturing a replay of ~3 us kernels records thousands of launches
ROTATE_BYTES = 256 << 20  # operand copies cycled through per graph timing: ~4x the 60 MB L2 of an H200
MAX_COPIES = 512
COPY_BYTES = {False: 1 << 30, True: 1 << 20}  # ceilings: bytes copied, matmul size (GPU, dry run)
MATMUL_SIZE = {False: 8192, True: 64}

Call = Callable[[], object]


@dataclass
class Setup:
    """One set of operands: a call per provider over them, and what to check each call against.

    ``outputs[p]`` (optional) runs provider ``p`` once and returns what to compare, for calls that write in place
    or return another layout; by default the call's return value is compared. ``references[p]`` replaces the
    reference for a provider that computes something else (the fp16 GEMM a quantized one is timed against).
    ``copies()`` returns calls over fresh copies of the big operands (``copy_bytes`` each), for CUDA-graph timings
    (see :func:`time_calls`).
    """

    calls: dict[str, Call]
    reference: object  # a tensor or a tuple of tensors, in float32 or wider
    outputs: dict[str, Call] = field(default_factory=dict)
    references: dict[str, object] = field(default_factory=dict)
    copies: Callable[[], dict[str, Call]] | None = None
    copy_bytes: int = 0


@dataclass
class Case:
    """One measurement point: ``x`` of the sweep ``sweep`` for one ``variant`` of a kernel, in one dtype."""

    kernel: str  # the family: "layernorm", "linear", ...
    name: str  # says everything about the case, e.g. "layer_norm+residual 4096x1024"
    dtype: torch.dtype
    setup: Callable[[], Setup]
    flops: float = 0.0
    nbytes: float = 0.0  # bytes the kernel must move at least (its memory roofline)
    sweep: str = ""  # the swept quantity ("rows", "M", "seq_len", ...)
    x: int = 0  # its value here
    variant: str = ""  # what else tells cases of one sweep apart ("residual", "qkv", "int4 lm_head", ...)
    tol: float | None = None  # None: TOL of the dtype
    params: dict = field(default_factory=dict)  # extra fields for the rows (gpu_check's JSON keeps them)


@dataclass
class Timing:
    status: str  # OK, FAIL (validation), ERROR (raised), SKIP (budget, or not asked for)
    ms: float | None = None
    err: float | None = None
    reason: str = ""


@dataclass
class Result:
    case: Case
    tol: float
    timings: dict[str, Timing]
    method: str = ""
    roofline_ms: float | None = None
    traceback: str = ""

    def ok(self, provider: str) -> bool:
        return provider in self.timings and self.timings[provider].status == "OK"


@dataclass
class Bench:
    """How this run measures: where, which providers, how to compile, until when; the ceilings once measured."""

    device: torch.device
    dry_run: bool
    deadline: float = math.inf  # time.monotonic() after which cases are SKIPped
    providers: tuple[str, ...] | None = None  # None: every provider a case offers
    compile_mode: str | None = None  # torch.compile's mode (inductor only)
    copy_gbps: float | None = None
    matmul_tflops: dict[str, float] = field(default_factory=dict)  # per dtype name
    timers: Timers | None = None  # how a GPU run times calls; None: triton.testing's (tests swap in fakes)

    @property
    def compile_backend(self) -> str:
        """inductor on a GPU; on the dry run's CPU, dynamo's capture only (``eager``): inductor's C++ build of every
        case would take minutes, and what it proves (no graph break, same results) holds without it."""
        return "eager" if self.dry_run else "inductor"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def __post_init__(self) -> None:
        # Operands come from a generator of the bench's own, seeded from torch's default one (so
        # ``torch.manual_seed`` still fixes a run): a CUDA-graph capture that fails part-way leaves the default CUDA
        # generator mid-capture, and every later draw from it raises ("Offset increment outside graph capture"),
        # which on the first H200 run turned every paged-decode case after the first into an ERROR.
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(torch.randint(2**62, ())))

    def randn(self, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(*shape, device=self.device, dtype=torch.float32, generator=self.generator)
        return (x * scale).to(dtype)

    def randperm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, device=self.device, generator=self.generator)

    def compile(self, fn: Callable) -> Callable:
        """``torch.compile`` of torch code, whole graph (a graph break raises), static shapes."""
        mode = self.compile_mode if self.compile_backend == "inductor" else None
        return torch.compile(fn, backend=self.compile_backend, mode=mode, dynamic=False, fullgraph=True)

    def roofline_ms(self, case: Case) -> float | None:
        """The floor set by the measured ceilings: bytes over copy bandwidth, or flops over the matmul rate,
        whichever is larger; None until the ceilings are measured."""
        times = []
        if case.nbytes and self.copy_gbps:
            times.append(case.nbytes / (self.copy_gbps * 1e6))
        rate = self.matmul_tflops.get(dtype_name(case.dtype))
        if case.flops and rate:
            times.append(case.flops / (rate * 1e9))
        return max(times) if times else None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (inf or nan when out has NaNs); tuples: the worst element."""
    if isinstance(ref, (tuple, list)):
        if not isinstance(out, (tuple, list)) or len(out) != len(ref):
            raise ValueError(f"output has {type(out).__name__}, reference a tuple of {len(ref)}")
        return max(rel_err(o, r) for o, r in zip(out, ref))
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"output shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------- timing


def _wall_ms(fn: Call) -> float:
    """One call's wall time (dry run: the interpreter on CPU; these numbers mean nothing)."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _cycling(fns: list[Call]) -> Call:
    """One callable that runs ``fns`` in turn: captured into a CUDA graph, consecutive calls use other copies."""
    it = itertools.cycle(fns)
    return lambda: next(it)()


def device_ms(fn: Call) -> float:
    """Median device time of one call (L2 flushed first, as ``do_bench`` does), without the host's launch time.

    ``do_bench`` times a call from an event queued before it to one queued after it, so when the launcher spends
    longer on the host than the GPU needs for the L2 flush queued before it (~60 us for 256 MB on an H200), the
    GPU waits for the launch and the time is the host's. Here a GPU spin is queued first: the host has queued
    the flush, the events and the whole call before the GPU reaches them.
    """
    from triton import runtime

    driver = runtime.driver.active
    cache = driver.get_empty_cache_for_benchmark()
    times = []
    for _ in range(PROBE_REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(PROBE_SPIN_CYCLES)
        driver.clear_cache(cache)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@dataclass(frozen=True)
class Timers:
    """How a GPU run times a call, in ms (tests swap in fakes): ``device`` decides the method (device time alone),
    ``plain`` (``do_bench``, L2 flushed) or ``graph`` (``do_bench_cudagraph``) times it."""

    device: Callable[[Call], float]
    plain: Callable[[Call], float]
    graph: Callable[[Call], float]
    syncs: Callable[[Call], bool] = lambda fn: False  # whether a call waits on the device from the host


def gpu_timers() -> Timers:
    from triton.testing import do_bench, do_bench_cudagraph

    return Timers(
        device=device_ms,
        plain=lambda fn: do_bench(fn, return_mode="median"),
        graph=lambda fn: do_bench_cudagraph(fn, rep=GRAPH_REP_MS, return_mode="median"),
        syncs=host_syncs,
    )


def host_syncs(fn: Call) -> bool:
    """Whether a call waits on the GPU from the host (a device value read: ``.item()``, ``bool()``, a boolean mask),
    run once under torch's sync debug mode. A CUDA graph can't capture such a call, and trying breaks the capture
    part-way (the torch backend's paged decode on the first H200 run)."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return False


def rotations(calls: dict[str, Call], setup: Setup) -> tuple[dict[str, list[Call]], str]:
    """Each provider's calls over the operand copies a graph timing cycles through (see :class:`Setup`), and the
    method that names them."""
    rotated = {p: [fn] for p, fn in calls.items()}
    if setup.copies is None:
        return rotated, "cudagraph"
    n = max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / max(setup.copy_bytes, 1))))
    for _ in range(n - 1):
        fresh = setup.copies()
        for p in rotated:
            rotated[p].append(fresh[p])
    return rotated, f"cudagraph, {n} operand copies"


def time_calls(bench: Bench, calls: dict[str, Call], setup: Setup) -> tuple[dict[str, float], str]:
    """Median ms of each call, all measured the same way, and how (see the module's docstring).

    The method is chosen on device times, not on ``do_bench``'s, which are the host's launch times when those are
    longer (see :func:`device_ms`). Chosen on ``do_bench``, a case whose providers all launch from Python (the
    split-K and decode-config sweeps: our launcher against itself) was timed at its host time, 100-250 us for
    ~8 us GEMVs on the first H200 run, while the linear section's cuBLAS peer sent the same launcher to graphs.
    """
    if bench.dry_run:
        if setup.copies is not None:  # the GPU's graph timings run on copies: prove they run, without recompiling
            with torch._dynamo.config.patch(error_on_recompile=True):
                fresh = setup.copies()
                for p in calls:
                    fresh[p]()
        return {p: _wall_ms(fn) for p, fn in calls.items()}, "wallclock-interpreter"
    timers = bench.timers or gpu_timers()

    def plainly(why: str = "") -> tuple[dict[str, float], str]:
        return {p: timers.plain(fn) for p, fn in calls.items()}, f"do_bench ({why})" if why else "do_bench"

    if min(timers.device(fn) for fn in calls.values()) >= GRAPH_BELOW_MS:
        return plainly()
    syncing = [p for p, fn in calls.items() if timers.syncs(fn)]
    if syncing:
        return plainly(f"{', '.join(syncing)} syncs: no graph")
    rotated, method = rotations(calls, setup)
    try:
        return {p: timers.graph(_cycling(fns)) for p, fns in rotated.items()}, method
    except Exception as e:  # noqa: BLE001 - e.g. a call that syncs: time them all plainly, say why
        torch.cuda.synchronize()
        return plainly(f"graph failed: {type(e).__name__}: {str(e)[:120]}")


def _validate(call: Call, reference, tol: float) -> Timing:
    try:
        err = rel_err(call(), reference)
    except Exception as e:  # noqa: BLE001 - one broken provider must not lose the others
        return Timing("ERROR", reason=f"{type(e).__name__}: {e}"[:500])
    if not err <= tol:  # NaN fails too
        return Timing("FAIL", err=err, reason=f"rel err {err:.3g} > tol {tol:.1g}")
    return Timing("OK", err=err)


def measure(bench: Bench, case: Case, providers: tuple[str, ...] | None = None) -> Result:
    """Validate every provider of ``case`` (or those in ``providers``, default ``bench.providers``), then time
    those that passed; one :class:`Timing` each."""
    tol = case.tol if case.tol is not None else TOL[dtype_name(case.dtype)]
    result = Result(case, tol, {})
    wanted = providers if providers is not None else bench.providers
    first = wanted[0] if wanted else OURS  # the provider a SKIP or setup ERROR is recorded under
    if bench.left() < 0:
        result.timings[first] = Timing("SKIP", reason="time budget spent")
        return result
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()  # compiled code of earlier cases: each case compiles for its own static shapes
    try:
        setup = case.setup()  # may fill in the case's bytes (a quantized weight's size is known once it exists)
        result.roofline_ms = bench.roofline_ms(case)
        calls = {p: fn for p, fn in setup.calls.items() if wanted is None or p in wanted}
        for p, fn in calls.items():
            result.timings[p] = _validate(setup.outputs.get(p, fn), setup.references.get(p, setup.reference), tol)
        passed = {p: fn for p, fn in calls.items() if result.timings[p].status == "OK"}
        if passed:
            times, result.method = time_calls(bench, passed, setup)
            for p, ms in times.items():
                result.timings[p].ms = ms
    except Exception as e:  # noqa: BLE001 - setup (allocation, imports) or timing failed: the case is an ERROR
        reason = f"{type(e).__name__}: {e}"[:500]
        for p in result.timings.keys() | {first}:
            if result.timings.get(p) is None or result.timings[p].status == "OK":
                result.timings[p] = Timing("ERROR", reason=reason)
        result.traceback = traceback.format_exc()[-3000:]
    return result


# ------------------------------------------------------------------------------------------------ ceilings


def copy_case(bench: Bench, nbytes: int) -> Case:
    """Device-to-device ``copy_`` of ``nbytes`` (read + write): the memory ceiling."""

    def setup() -> Setup:
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=bench.device, generator=bench.generator)
        dst = torch.empty_like(src)
        return Setup(calls={"torch": lambda: dst.copy_(src)}, reference=src)

    return Case("ceilings", f"torch copy {nbytes >> 20} MiB", torch.uint8, setup, nbytes=2 * nbytes, tol=0.0)


def matmul_case(bench: Bench, dtype: torch.dtype, m: int) -> Case:
    """An ``m``^3 cuBLAS matmul in ``dtype``: the compute ceiling."""

    def setup() -> Setup:
        a, b = bench.randn(m, m, dtype=dtype), bench.randn(m, m, dtype=dtype)
        return Setup(calls={"torch": lambda: a @ b}, reference=a.float() @ b.float())

    return Case("ceilings", f"torch matmul {m}^3", dtype, setup, flops=2.0 * m**3)


def measure_ceilings(bench: Bench, dtypes: Iterable[torch.dtype]) -> list[Result]:
    """Copy bandwidth (once) and the matmul rate of each dtype, stored on ``bench``; their results."""
    results = []
    if bench.copy_gbps is None:
        res = measure(bench, copy_case(bench, COPY_BYTES[bench.dry_run]), ("torch",))
        if res.ok("torch"):
            bench.copy_gbps = res.case.nbytes / res.timings["torch"].ms * 1e-6
        results.append(res)
    for dtype in dtypes:
        res = measure(bench, matmul_case(bench, dtype, MATMUL_SIZE[bench.dry_run]), ("torch",))
        if res.ok("torch"):
            bench.matmul_tflops[dtype_name(dtype)] = res.case.flops / res.timings["torch"].ms * 1e-9
        results.append(res)
    return results


# ---------------------------------------------------------------------------------------------------- rows


def environment(dry_run: bool) -> dict:
    """Where and when: GPU (or the dry run's CPU), library versions, date, commit."""
    import triton

    if dry_run or not torch.cuda.is_available():
        gpu = f"cpu-interpreter ({platform.processor() or 'cpu'})"
    else:
        gpu = torch.cuda.get_device_name(0)
    git = lambda *args: subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short=12", "HEAD") + ("-dirty" if git("status", "--porcelain", "-uno") else "")
    except OSError:  # no git
        commit = ""
    commit = commit or "unknown"  # e.g. a copy of the tree without .git, on a lent device machine
    return dict(
        date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        gpu=gpu,
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda or "",
        python=platform.python_version(),
        commit=commit,
        dry_run=dry_run,
    )


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


COLUMNS = (
    "date", "gpu", "torch", "triton", "cuda", "python", "commit", "dry_run",
    "kernel", "sweep", "x", "variant", "dtype", "name", "provider", "status", "ms",
    "tflops", "gbps", "pct_roofline", "roofline_ms", "triton_speedup", "flops", "bytes",
    "copy_gbps", "matmul_tflops", "rel_err", "tol", "method", "reason", "params",
)  # fmt: skip


def csv_rows(bench: Bench, result: Result, env: dict) -> list[dict]:
    """One row per provider: its time, TFLOP/s, GB/s, % of the roofline, and how much faster triton was."""
    case = result.case
    ours = result.timings.get(OURS)
    rows = []
    for provider, t in result.timings.items():
        row = dict(env, kernel=case.kernel, sweep=case.sweep, x=case.x, variant=case.variant,
                   dtype=dtype_name(case.dtype), name=case.name, provider=provider, status=t.status,
                   flops=case.flops, bytes=case.nbytes, copy_gbps=bench.copy_gbps,
                   matmul_tflops=bench.matmul_tflops.get(dtype_name(case.dtype)), rel_err=t.err, tol=result.tol,
                   method=result.method, reason=t.reason, params=json.dumps(case.params, default=str))  # fmt: skip
        if t.ms:
            row.update(ms=t.ms, roofline_ms=result.roofline_ms)
            if case.flops:
                row["tflops"] = case.flops / t.ms * 1e-9
            if case.nbytes:
                row["gbps"] = case.nbytes / t.ms * 1e-6
            if result.roofline_ms:
                row["pct_roofline"] = 100.0 * result.roofline_ms / t.ms
            if ours is not None and ours.ms:
                row["triton_speedup"] = t.ms / ours.ms
        rows.append({c: row.get(c) for c in COLUMNS})
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append to a CSV (header written when the file is new) or, for ``.jsonl``, one JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        with path.open("a") as f:
            f.writelines(json.dumps(row, default=str) + "\n" for row in rows)
        return
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows({c: "" if row.get(c) is None else row[c] for c in COLUMNS} for row in rows)


def read_rows(path: Path) -> list[dict]:
    """Rows of a CSV written by :func:`append_rows`, numbers as floats, empty fields as None."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    numeric = ("x", "ms", "tflops", "gbps", "pct_roofline", "roofline_ms", "triton_speedup", "flops", "bytes",
               "copy_gbps", "matmul_tflops", "rel_err", "tol")  # fmt: skip
    for row in rows:
        for c in row:
            if row[c] == "":
                row[c] = None
            elif c in numeric:
                row[c] = float(row[c])
    return rows


def describe(result: Result) -> str:
    """One console line: each provider's time (or status), the ratios to ours, our % of the roofline."""
    case, parts = result.case, []
    ours = result.timings.get(OURS)
    for provider, t in result.timings.items():
        if t.status != "OK":
            parts.append(f"{provider} {t.status}" + (f" ({t.reason[:80]})" if t.reason else ""))
            continue
        ratio = f" x{t.ms / ours.ms:.2f}" if ours is not None and ours.ms and provider != OURS else ""
        parts.append(f"{provider} {t.ms * 1e3:.1f} us{ratio}")
    roof = ""
    if ours is not None and ours.ms and result.roofline_ms:
        roof = f"  [{100.0 * result.roofline_ms / ours.ms:.0f}% roofline]"
    return f"  {case.kernel:10s} {dtype_name(case.dtype):8s} {case.name:42s} " + " | ".join(parts) + roof


# ------------------------------------------------------------------------------------------ the scripts' CLI


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny sizes: code paths only")
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--providers", nargs="+", default=None, help=f"subset of providers (default all; {OURS} first)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--budget", type=float, default=None, help="seconds; cases that would start later are SKIPped")
    ap.add_argument("--out", default=None, help="CSV (or .jsonl) to append to (default bench/results/kernels.csv; "
                    "dry run: $TMPDIR/kernels_dryrun.csv)")  # fmt: skip
    return ap


def default_out(dry_run: bool) -> Path:
    if dry_run:  # a dry run's numbers mean nothing: they stay out of bench/results unless asked for
        return Path(os.environ.get("TMPDIR", "/tmp")) / "kernels_dryrun.csv"
    return RESULTS / "kernels.csv"


def use_interpreter(dry_run: bool) -> None:
    """Before anything imports triton: the interpreter for a dry run, never for a real one (it would time numpy)."""
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)


def main(
    kernel: str,
    description: str,
    cases: Callable[[Bench, torch.dtype, argparse.Namespace], Iterable[Case]],
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """A kernel script: ceilings, then every case of every dtype; rows appended to ``--out``.

    Exit code 0 when every validation passed, 1 otherwise, 2 without a CUDA GPU (and no ``--dry-run``).
    """
    ap = parser(description)
    if add_arguments is not None:
        add_arguments(ap)
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(f"{kernel}: needs a CUDA GPU; none found (torch {torch.__version__}). Try --dry-run.", file=sys.stderr)
        return 2
    use_interpreter(args.dry_run)
    start = time.monotonic()
    bench = Bench(
        device=torch.device("cpu" if args.dry_run else "cuda"),
        dry_run=args.dry_run,
        deadline=start + args.budget if args.budget is not None else math.inf,
        providers=tuple(args.providers) if args.providers else None,
        compile_mode=args.compile_mode,
    )
    env = environment(args.dry_run)
    out = Path(args.out) if args.out else default_out(args.dry_run)
    dtypes = [getattr(torch, d) for d in args.dtype]
    print(f"{kernel} on {env['gpu']}: torch {env['torch']}, triton {env['triton']}, commit {env['commit']}", flush=True)
    torch.manual_seed(0)
    results = measure_ceilings(bench, dtypes)
    for res in results:
        print(describe(res), flush=True)
    print(f"  ceilings: copy {bench.copy_gbps or 0:.0f} GB/s, matmul "
          + ", ".join(f"{d} {v:.0f} TFLOP/s" for d, v in bench.matmul_tflops.items()), flush=True)  # fmt: skip
    rows, bad = [], 0
    for dtype in dtypes:
        for case in cases(bench, dtype, args):
            res = measure(bench, case)
            print(describe(res), flush=True)
            if res.traceback:
                print(res.traceback, file=sys.stderr, flush=True)
            bad += any(t.status in ("FAIL", "ERROR") for t in res.timings.values())
            rows += csv_rows(bench, res, env)
    append_rows(out, rows)
    print(f"{len(rows)} rows appended to {out} in {time.monotonic() - start:.0f} s; plot: python bench/plot.py {out}")
    return 1 if bad else 0
