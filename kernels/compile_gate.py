"""Ahead-of-time compile gate: compile every kernel config we ship for sm_80 and sm_90, without a GPU.

The Triton interpreter accepts code the real compiler rejects, and it says nothing about registers, spills or
shared memory. This gate compiles every :class:`kernels.specs.KernelSpec` of the spec modules (``compile_specs()``
of ``kernels/specs/<family>.py`` for each op family of ``kernels.KERNEL_MODULES``) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` — Triton ships ``ptxas`` and
``cuobjdump``, so no GPU is needed — and fails on a compile error, any register spill, or more shared memory
than the chip has. ``python -m engine check-kernels`` (or ``python -m kernels.compile_gate``) runs it.

Spec conventions: ``signature`` maps each non-constexpr argument to a Triton type ("*fp16", "i32", "fp32");
a ``:16`` suffix ("i32:16") promises divisibility by 16, as the runtime would specialize it. Pointers get
that 16-byte alignment hint by default, since torch allocations are aligned. Constexpr arguments left out of
``constexprs`` take their default value from the kernel's signature.

Under ``TRITON_INTERPRET=1`` every ``@triton.jit`` function is an interpreter object that cannot be compiled,
so the gate then runs itself in a subprocess with the variable removed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass

from kernels import KERNEL_MODULES

SPEC_MODULES = tuple(f"kernels.specs.{name}" for name in KERNEL_MODULES)  # what the gate compiles by default

# Largest dynamic shared memory one block may use (opt-in limit), bytes: A100 163 KB, H100/H200 227 KB.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# SASS opcodes that mean tensor cores: mma.sync (HMMA fp16/bf16/tf32, IMMA int8) and Hopper's wgmma
# (HGMMA fp16/bf16/tf32, IGMMA int8, QGMMA fp8).
TENSOR_CORE_OPS = ("HMMA", "IMMA", "HGMMA", "IGMMA", "QGMMA")
DEFAULT_JOBS = 2


@dataclass
class Row:
    """The outcome of compiling one spec (kernel x config) for one architecture."""

    module: str
    kernel: str  # KernelSpec.name
    arch: int
    num_warps: int = 0
    num_stages: int = 0
    status: str = "FAIL"  # "PASS" or "FAIL"
    reason: str = ""  # why it failed (empty when it passed)
    regs: int | None = None  # registers per thread
    spill_stores: int | None = None  # bytes, from ptxas -v (or the stack frame when the log is unavailable)
    spill_loads: int | None = None
    shared: int | None = None  # bytes of shared memory per block (Triton's metadata.shared)
    tensor_cores: str = ""  # tensor-core SASS opcodes found, "+"-joined; "" when none
    compile_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "PASS"


# --------------------------------------------------------------------------------------------- compile one


def _unwrap(fn: object) -> object:
    """The ``JITFunction`` under ``@triton.autotune`` / ``@triton.heuristics`` wrappers."""
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn") and seen < 8:
        fn, seen = fn.fn, seen + 1
    if not isinstance(fn, JITFunction):
        raise TypeError(f"spec.fn is {type(fn).__name__}, not a @triton.jit function")
    return fn


def _source(spec, fn):
    """Build the ``ASTSource`` for a spec: full signature in argument order, constexprs, alignment hints."""
    from triton.compiler import ASTSource

    unknown = set(spec.signature) | set(spec.constexprs)
    unknown -= set(fn.arg_names)
    if unknown:
        raise ValueError(f"spec names arguments the kernel does not have: {sorted(unknown)}")
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if name in spec.constexprs:
            signature[name], constexprs[name] = "constexpr", spec.constexprs[name]
        elif name in spec.signature:
            ty, _, hint = spec.signature[name].partition(":")
            signature[name] = ty.strip()
            if hint.strip() == "16" or (ty.startswith("*") and not hint):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif param.is_constexpr and param.has_default:
            signature[name], constexprs[name] = "constexpr", param.default
        else:
            raise ValueError(f"argument {name!r} is in neither spec.signature nor spec.constexprs")
    return ASTSource(fn, signature, constexprs, attrs)


_PTXAS_INT = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    """Run Triton's bundled ``cuobjdump`` on a cubin."""
    from triton import knobs

    fd, path = tempfile.mkstemp(suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        return subprocess.run(
            [knobs.nvidia.cuobjdump.path, *flags, path], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.remove(path)


def _compile(spec, arch: int) -> Row:
    """Compile one spec for ``sm_<arch>`` and measure it; never raises (a failure becomes a FAIL row)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    row = Row(module="", kernel=spec.name, arch=arch, num_warps=spec.num_warps, num_stages=spec.num_stages)
    log = io.StringIO()
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    start = time.perf_counter()
    try:
        fn = _unwrap(spec.fn)
        src = _source(spec, fn)
        options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
        # always_compile: a cache hit would skip ptxas, and its -v log is where the spill counts are.
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # noqa: BLE001 - any compiler failure is a gate failure, reported by message
        row.compile_s = time.perf_counter() - start
        row.reason = f"compile error: {_first_line(e)}"
        return row
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    row.compile_s = time.perf_counter() - start

    row.shared = int(compiled.metadata.shared)
    text = log.getvalue()
    for key, pattern in _PTXAS_INT.items():
        found = pattern.findall(text)
        if found:
            setattr(row, key, max(int(v) for v in found))
    cubin = compiled.asm.get("cubin")
    try:
        if row.regs is None or row.spill_stores is None:
            # No ptxas log (another Triton version): registers and stack frame from the cubin instead.
            usage = _cuobjdump(cubin, "--dump-resource-usage")
            reg, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
            row.regs = int(reg.group(1)) if reg else None
            row.spill_stores = row.spill_loads = int(stack.group(1)) if stack else None
        sass = _cuobjdump(cubin, "-sass")
        ops = sorted({op for op in re.findall(r"\b([A-Z]{4,5})(?:\.|\s)", sass) if op in TENSOR_CORE_OPS})
    except (OSError, subprocess.CalledProcessError):
        ptx = compiled.asm.get("ptx", "")  # no cuobjdump: fall back to the PTX mnemonics
        ops = [name for name, key in (("mma", "mma.sync"), ("wgmma", "wgmma.mma_async")) if key in ptx]
    row.tensor_cores = "+".join(ops)

    problems = []
    if row.spill_stores is None:
        problems.append("could not read spill counts")
    elif row.spill_stores or row.spill_loads:
        problems.append(f"register spills ({row.spill_stores} B stored, {row.spill_loads} B loaded)")
    limit = SMEM_LIMIT.get(arch)
    if limit is not None and row.shared > limit:
        problems.append(f"shared memory {row.shared} B > {limit} B limit of sm_{arch}")
    if spec.num_warps * 32 > 1024:
        problems.append(f"{spec.num_warps} warps exceed 1024 threads per block")
    row.status = "FAIL" if problems else "PASS"
    row.reason = "; ".join(problems)
    return row


def _first_line(e: BaseException) -> str:
    """A one-line summary of a compiler exception (they carry the whole source listing)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # Triton's CompilationError puts the source first and the message last; ptxas errors the reverse.
    interesting = [ln for ln in lines if re.search(r"error|Error|must|only|not |invalid|unsupported", ln)]
    msg = (interesting or lines or [""])[-1 if interesting else 0]
    return f"{type(e).__name__}: {msg}"[:300]


# ------------------------------------------------------------------------------------------ worker side


@functools.cache
def _specs(module: str) -> list:
    """Import a spec module and return its compile specs (cached per process)."""
    return list(importlib.import_module(module).compile_specs())


def _compile_task(module: str, index: int, arch: int) -> Row:
    """Worker entry point: compile spec ``index`` of ``module``."""
    try:
        spec = _specs(module)[index]
    except Exception as e:  # noqa: BLE001
        return Row(module=module, kernel=f"#{index}", arch=arch, reason=f"cannot load spec: {_first_line(e)}")
    row = _compile(spec, arch)
    row.module = module
    return row


# ------------------------------------------------------------------------------------------- driver side


def _select(specs: list, name_filter: str | None, max_per_module: int | None) -> list[int]:
    """Indices of the specs to compile: matching the filter, then thinned evenly to ``max_per_module``."""
    keep = [i for i, s in enumerate(specs) if not name_filter or name_filter in s.name]
    if max_per_module is not None and len(keep) > max_per_module:
        step = (len(keep) - 1) / max(max_per_module - 1, 1)
        keep = sorted({keep[round(j * step)] for j in range(max_per_module)})
    return keep


def _run_local(
    archs: tuple[int, ...], modules: tuple[str, ...], name_filter: str | None, jobs: int, max_per_module: int | None
) -> list[Row]:
    """Enumerate specs in this process and compile them in a pool of ``jobs`` worker processes."""
    rows: list[Row] = []
    tasks: list[tuple[str, int, int]] = []
    for module in modules:
        try:
            specs = _specs(module)
            if not specs:
                raise ValueError("compile_specs() returned no specs")
        except Exception as e:  # noqa: BLE001 - a module that does not load fails the gate, with the reason
            for arch in archs:
                rows.append(Row(module=module, kernel="<compile_specs>", arch=arch, reason=_first_line(e)))
            continue
        if name_filter and name_filter in module:
            chosen = _select(specs, None, max_per_module)
        else:
            chosen = _select(specs, name_filter, max_per_module)
        tasks += [(module, i, arch) for i in chosen for arch in archs]

    if jobs <= 1 or len(tasks) <= 1:
        return rows + [_compile_task(*t) for t in tasks]

    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # fork after torch/triton import is not safe
    retry = []
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx) as pool:
        futures: list[tuple[tuple, Future]] = [(t, pool.submit(_compile_task, *t)) for t in tasks]
        for task, fut in futures:
            try:
                rows.append(fut.result())
            except BrokenProcessPool:
                retry.append(task)
    for task in retry:  # a worker died (the compiler crashed): find the culprit one task at a time
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            try:
                rows.append(pool.submit(_compile_task, *task).result())
            except BrokenProcessPool:
                module, index, arch = task
                name = f"#{index}"
                with contextlib.suppress(Exception):
                    name = _specs(module)[index].name
                rows.append(Row(module=module, kernel=name, arch=arch, reason="compiler process crashed"))
    return rows


def _run_subprocess(
    archs: tuple[int, ...], modules: tuple[str, ...], name_filter: str | None, jobs: int, max_per_module: int | None
) -> list[Row]:
    """Run the gate in a fresh interpreter without ``TRITON_INTERPRET`` and read its rows back."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The child must import exactly what we can (tests add their own directories to sys.path).
    env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) if p else os.getcwd() for p in sys.path)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "kernels.compile_gate", "--quiet", "--json", out, "--jobs", str(jobs)]
        cmd += ["--arch", *map(str, archs), "--module", *modules]
        if name_filter:
            cmd.append(f"--filter={name_filter}")
        if max_per_module is not None:
            cmd += ["--max-per-module", str(max_per_module)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if not os.path.exists(out):
            raise RuntimeError(f"compile gate subprocess failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(out) as f:
            return [Row(**r) for r in json.load(f)]


def run_gate(
    archs: tuple[int, ...] | list[int] = (80, 90),
    modules: tuple[str, ...] | list[str] | None = None,
    name_filter: str | None = None,
    jobs: int = DEFAULT_JOBS,
    max_per_module: int | None = None,
) -> list[Row]:
    """Compile every spec of ``modules`` (default: every spec module) for each arch; one Row per compile.

    ``name_filter`` keeps specs whose name (or module name) contains it; ``max_per_module`` keeps that many
    specs per module, spread evenly over its list (first and last included) — a quick sample for tests.
    """
    archs = tuple(int(a) for a in archs)
    for a in archs:
        if a < 80:
            raise ValueError(f"arch sm_{a} is not a target (use 80 or 90)")
    modules = tuple(_module_name(m) for m in (modules or SPEC_MODULES))
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    from kernels.utils import is_interpreter

    if is_interpreter():
        return _run_subprocess(archs, modules, name_filter, jobs, max_per_module)
    return _run_local(archs, modules, name_filter, jobs, max_per_module)


def _module_name(name: str) -> str:
    """An op family's spec module for its name ("linear" or "kernels.linear"); any other module as it is."""
    family = name.removeprefix("kernels.")
    return f"kernels.specs.{family}" if family in KERNEL_MODULES else name


# ---------------------------------------------------------------------------------------------------- CLI


def format_table(rows: list[Row]) -> str:
    """The gate's table: one line per kernel x config x arch, failures explained."""
    head = ("module", "kernel", "sm", "warps", "stages", "regs", "spill B", "smem KB", "TC", "time s", "status")
    body = []
    for r in sorted(rows, key=lambda r: (r.module, r.kernel, r.arch)):
        spill = "?" if r.spill_stores is None else str(r.spill_stores + (r.spill_loads or 0))
        body.append(
            (
                r.module.removeprefix("kernels.specs.").removeprefix("kernels."),
                r.kernel,
                str(r.arch),
                str(r.num_warps),
                str(r.num_stages),
                "?" if r.regs is None else str(r.regs),
                spill if r.status == "PASS" or r.regs is not None else "-",
                "-" if r.shared is None else f"{r.shared / 1024:.1f}",
                r.tensor_cores or "-",
                f"{r.compile_s:.1f}",
                r.status if r.ok else f"FAIL: {r.reason}",
            )
        )
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    widths[-1] = 0  # the last column is free text
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths[:-1]] + ["------"])] + [fmt(b) for b in body])


def summary(rows: list[Row], seconds: float) -> str:
    """One line: how many compiles passed, and why the others failed."""
    failed = [r for r in rows if not r.ok]
    kinds = {
        "errors": sum("error" in r.reason or "crashed" in r.reason or r.kernel.startswith("<") for r in failed),
        "spills": sum("spill" in r.reason for r in failed),
        "smem": sum("shared memory" in r.reason for r in failed),
    }
    why = ", ".join(f"{n} {k}" for k, n in kinds.items() if n)
    if not rows:
        return f"compile gate FAIL: no kernel specs matched in {seconds:.1f} s"
    verdict = "FAIL" if failed else "PASS"
    return (
        f"compile gate {verdict}: {len(rows)} compiles, {len(rows) - len(failed)} passed, {len(failed)} failed"
        + (f" ({why})" if why else "")
        + f" in {seconds:.1f} s"
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2, like the rest of the CLI
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    """``check-kernels``: print the table and summary; exit 0 when every compile passes, 1 otherwise."""
    p = _Parser(prog="gpt2-triton check-kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="CUDA archs to compile for (80, 90)")
    p.add_argument("--filter", default=None, help="only specs whose name or module contains this substring")
    p.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="parallel compile processes")
    p.add_argument("--module", nargs="+", default=None, help="op families (default: all), e.g. linear")
    p.add_argument("--max-per-module", type=int, default=None, help="compile only this many specs per module")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no table, only the summary line")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        rows = run_gate(args.arch, args.module, args.filter, args.jobs, args.max_per_module)
    except ValueError as e:
        p.error(str(e))
    except RuntimeError:
        traceback.print_exc()
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    if not args.quiet:
        print(format_table(rows))
    print(summary(rows, time.perf_counter() - start))
    return 0 if rows and all(r.ok for r in rows) else 1


__all__ = ["SPEC_MODULES", "SMEM_LIMIT", "Row", "run_gate", "main", "format_table", "summary"]

if __name__ == "__main__":
    sys.exit(main())
