"""One-shot GPU check: run the CUDA tests, then time every kernel against its PyTorch peer and score the goals.

    python bench/gpu_check.py                    # on a CUDA machine: tests + benchmarks, about 5 minutes
    python bench/gpu_check.py --skip-tests       # benchmarks only
    python bench/gpu_check.py --dry-run          # CPU: every section on tiny shapes under the Triton interpreter

Every kernel is first checked against a float32 reference on the same inputs, then timed with
``triton.testing.do_bench`` (median, L2 flushed; kernels under ~100 us are re-timed as CUDA-graph replays
cycling through copies of their weights or caches, so launch overhead is hidden and operands still come from
device memory) next to its peer: cuBLAS ``addmm`` plus torch's separate GELU / residual add for the linear
layers, fp16 cuBLAS for the int8/int4 GEMVs, ``scaled_dot_product_attention`` for prefill and (over the
pre-gathered cache) decode, and torch's own LayerNorm / GELU / index-put. Shapes are GPT-2 Medium's. Then the
engine end to end (decode tokens/s vs our torch backend and transformers), and two sweeps for tuning: every
decode-attention launch config, and forced split-K depths of the M=1 GEMMs; last, in what is left of the
budget, the tests that compile and check every autotune config (``-k every_tuned``). Rows are written to
``bench/results/gpu_check_<gpu>_<date>.json`` (``--results-dir``) after every section, with the configs the
autotuner picked, so a crash loses nothing already measured.

Exit codes: 0 all validations (and tests) passed, 1 something was wrong, 2 no CUDA GPU (and not --dry-run).
Performance goals print PASS/MISS but never change the exit code.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import functools
import importlib
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
AUTOTUNE_ENV = "GPT2_TRITON_AUTOTUNE"  # kernels.utils.AUTOTUNE_ENV (read here without importing triton)
# Tests that exercise kernels and the Triton model on the device (others are CPU-only logic), the whole-model
# test (CUDA-graph decode) first: should the run hit its time cap, the end-to-end checks have already run.
GPU_TESTS = (
    "engine/test_triton_model.py",
    "kernels/test_paged_attention.py",
    "kernels/test_kv_cache.py",
    "kernels/test_attention.py",
    "kernels/test_context_attention.py",
    "kernels/test_layernorm.py",
    "kernels/test_gelu.py",
    "kernels/test_quant.py",
    "kernels/test_linear.py",
)
TEST_WORKERS = 8  # pytest-xdist processes sharing the GPU, when xdist is installed
# The tests that compile and run every autotune config of a kernel (tests.helpers.tuning_every_config): ~100
# compiles, so they run after the benchmarks, in what is left of the budget, if at least MIN_TEST_SECONDS.
EVERY_CONFIG_TESTS = "every_tuned"
MIN_TEST_SECONDS = 30.0
TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}  # relative-norm error vs the float32 reference
GRAPH_BELOW_MS = 0.1  # kernels faster than this are re-timed with CUDA-graph replay (launch overhead hidden)
GRAPH_REP_MS = 10  # GPU time per graph replay; capturing a replay of ~3 us kernels records thousands of launches
ROTATE_BYTES = 256 << 20  # operand copies cycled through per graph timing: ~4x the 60 MB L2 of an H200
MAX_COPIES = 512


@dataclass
class Shapes:
    """Benchmark sizes: GPT-2 Medium on a GPU, tiny ones for the interpreter dry run."""

    d: int = 1024
    heads: int = 16
    head_dim: int = 64
    d_ff: int = 4096
    vocab: int = 50257
    linear_m: tuple[int, ...] = (1, 16, 64, 512, 4096, 16384)
    quant_m: tuple[int, ...] = (1, 16)
    prefill: tuple[int, int] = (8, 1024)  # batch x tokens per sequence
    decode_batch: tuple[int, ...] = (1, 32, 64)
    decode_ctx: int = 1024
    block_size: int = 16
    ln_shapes: tuple[tuple[int, int], ...] = ((16384, 1024), (4096, 8192))  # GPT-2 Medium, the widest supported
    gelu_rows: int = 16384
    copy_bytes: int = 1 << 30
    matmul_size: int = 8192
    store_tokens: tuple[int, ...] = (64, 8192)
    engine_model: dict = field(default_factory=lambda: dict(n_embd=1024, n_layer=24, n_head=16))  # gpt2-medium
    engine_batch: tuple[int, ...] = (1, 32)
    engine_prompt: int = 64
    engine_new_tokens: int = 64
    engine_repeats: int = 3

    @classmethod
    def tiny(cls) -> Shapes:
        return cls(
            d=128,
            heads=2,
            head_dim=64,
            d_ff=256,
            vocab=1000,
            linear_m=(1, 17),
            quant_m=(1,),
            prefill=(2, 40),
            decode_batch=(1, 3),
            decode_ctx=40,
            ln_shapes=((33, 128), (5, 1600)),
            gelu_rows=33,
            copy_bytes=1 << 20,
            matmul_size=64,
            store_tokens=(5,),
            engine_model=dict(n_embd=64, n_layer=2, n_head=1, n_positions=64, vocab_size=500),
            engine_batch=(1, 2),
            engine_prompt=5,
            engine_new_tokens=3,
            engine_repeats=1,
        )

    def layers(self) -> list[tuple[str, int, int, bool, str | None, bool]]:
        """GPT-2's linear layers: (name, K, N, bias, activation, residual)."""
        d, f = self.d, self.d_ff
        return [
            ("qkv", d, 3 * d, True, None, False),
            ("attn_out+res", d, d, True, None, True),
            ("fc+gelu", d, f, True, "gelu_tanh", False),
            ("mlp_out+res", f, d, True, None, True),
            ("lm_head", d, self.vocab, False, None, False),
        ]


@dataclass
class Check:
    """Run state: where rows go, how to time, how much time is left."""

    device: object
    dtype: object
    shapes: Shapes
    dry_run: bool
    deadline: float
    out_path: Path
    meta: dict
    rows: list[dict] = field(default_factory=list)
    copy_gbps: float | None = None  # measured ceilings (section "copy")
    matmul_tflops: float | None = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, **row) -> dict:
        self.rows.append(row)
        return row

    def save(self) -> None:
        """Write everything measured so far (atomically, so a crash mid-write keeps the last good file)."""
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.meta, "rows": self.rows}, indent=1, default=str))
        os.replace(tmp, self.out_path)


# ------------------------------------------------------------------------------------------------- helpers


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (inf when out has NaNs)."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _wall_ms(fn: Callable[[], object], reps: int = 3) -> float:
    """Median wall time of ``fn`` (dry run: the interpreter on CPU; these numbers mean nothing)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _cycling(fns: list[Callable[[], object]]) -> Callable[[], object]:
    """One callable that runs ``fns`` in turn: captured into a CUDA graph, consecutive calls use other copies."""
    it = itertools.cycle(fns)
    return lambda: next(it)()


def time_pair(
    ck: Check,
    ours: Callable[[], object],
    peer: Callable[[], object],
    copies: tuple[Callable[[], tuple[Callable, Callable]], int] | None = None,
) -> tuple[float, float, str]:
    """Median ms of ours and of the peer, measured the same way.

    ``do_bench`` flushes L2 before every call. When either side runs under ``GRAPH_BELOW_MS``, both are re-timed
    as CUDA-graph replays, which hide launch overhead but keep L2 warm; ``copies = (make, nbytes)`` then builds
    fresh ``(ours, peer)`` pairs over copies of the big operands (``nbytes`` each), cycled through so that
    every call reads its operands from device memory, as a decode step reads each layer's weights.
    """
    if ck.dry_run:
        return _wall_ms(ours, 1), _wall_ms(peer, 1), "wallclock-interpreter"
    import torch
    from triton.testing import do_bench, do_bench_cudagraph

    t_ours = do_bench(ours, return_mode="median")
    t_peer = do_bench(peer, return_mode="median")
    if min(t_ours, t_peer) >= GRAPH_BELOW_MS:
        return t_ours, t_peer, "do_bench"
    ours_fns, peer_fns, method = [ours], [peer], "cudagraph"
    if copies is not None:
        make, nbytes = copies
        n = max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / max(nbytes, 1))))
        for _ in range(n - 1):
            o, p = make()
            ours_fns.append(o)
            peer_fns.append(p)
        method = f"cudagraph, {n} operand copies"
    try:
        g_ours = do_bench_cudagraph(_cycling(ours_fns), rep=GRAPH_REP_MS, return_mode="median")
        g_peer = do_bench_cudagraph(_cycling(peer_fns), rep=GRAPH_REP_MS, return_mode="median")
        return g_ours, g_peer, method
    except Exception as e:  # noqa: BLE001 - e.g. a launcher that syncs: keep the plain timing, say why
        torch.cuda.synchronize()
        return t_ours, t_peer, f"do_bench (graph failed: {type(e).__name__}: {str(e)[:120]})"


def bench_case(
    ck: Check,
    section: str,
    name: str,
    *,
    ours: Callable[[], object],
    peer: Callable[[], object],
    check: Callable[[], tuple[float, float]],
    flops: float = 0.0,
    nbytes: float = 0.0,
    peer_flops: float | None = None,
    copies: tuple[Callable[[], tuple[Callable, Callable]], int] | None = None,
    **extra,
) -> dict:
    """Validate ours (``check`` returns ``(err, tol)``), then time ours and the peer; one row either way.

    ``copies``: see :func:`time_pair`.
    """
    row = dict(section=section, name=name, **extra)
    if ck.left() < 0:
        row.update(status="SKIP", reason="time budget spent")
        return ck.add(**row)
    try:
        err, tol = check()
        row.update(rel_err=err, tol=tol)
        if not err <= tol:  # NaN fails too
            row.update(status="FAIL", reason=f"rel err {err:.3g} > tol {tol:.1g}")
            print(f"  {section:8s} {name:40s} FAIL rel_err={err:.3g} > {tol:.1g}", flush=True)
            return ck.add(**row)
        t_ours, t_peer, method = time_pair(ck, ours, peer, copies)
    except Exception as e:  # noqa: BLE001 - one broken case must not lose the others
        row.update(status="ERROR", reason=f"{type(e).__name__}: {e}"[:500], traceback=traceback.format_exc()[-3000:])
        print(f"  {section:8s} {name:40s} ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
        return ck.add(**row)
    row.update(status="OK", ours_ms=t_ours, peer_ms=t_peer, speedup=t_peer / t_ours, method=method)
    if flops:
        row.update(tflops=flops / t_ours * 1e-9, peer_tflops=(peer_flops or flops) / t_peer * 1e-9)
    if nbytes:
        row.update(gbps=nbytes / t_ours * 1e-6, peer_gbps=nbytes / t_peer * 1e-6)
        if ck.copy_gbps:
            row["pct_copy_bw"] = 100.0 * row["gbps"] / ck.copy_gbps
    floor = roofline_ms(ck, flops, nbytes)
    if floor:
        row.update(roofline_ms=floor, pct_roofline=100.0 * floor / t_ours)
    perf = f"{row['tflops']:7.2f} TF/s" if flops and not nbytes or section in ("linear", "prefill") else ""
    if not perf:
        perf = f"{row['gbps']:7.0f} GB/s" + (f" {row['pct_copy_bw']:5.1f}% copy" if "pct_copy_bw" in row else "")
    roof = f"  {row['pct_roofline']:5.1f}% roofline" if floor else ""
    print(
        f"  {section:8s} {name:40s} ours {t_ours * 1e3:9.1f} us  peer {t_peer * 1e3:9.1f} us  "
        f"x{row['speedup']:.2f}  {perf}{roof}  err {err:.1e}",
        flush=True,
    )
    return ck.add(**row)


def roofline_ms(ck: Check, flops: float, nbytes: float) -> float | None:
    """The floor set by the measured ceilings: bytes over copy bandwidth, or flops over the matmul rate,
    whichever is larger (METHOD.md's "two numbers"); None until the ceilings are measured."""
    times = []
    if nbytes and ck.copy_gbps:
        times.append(nbytes / (ck.copy_gbps * 1e6))
    if flops and ck.matmul_tflops:
        times.append(flops / (ck.matmul_tflops * 1e9))
    return max(times) if times else None


def _randn(ck: Check, *shape, scale: float = 1.0):
    import torch

    return (torch.randn(*shape, device=ck.device, dtype=torch.float32) * scale).to(ck.dtype)


def _dtype_name(ck: Check) -> str:
    return str(ck.dtype).removeprefix("torch.")


def _tol(ck: Check) -> float:
    return TOL[_dtype_name(ck)]


# ------------------------------------------------------------------------------------------------ sections


def section_tests(ck: Check, files: list[str], timeout: float, select: str) -> None:
    """Run the kernel and Triton-model tests that pytest's ``-k select`` picks on the device, in a subprocess
    killed after ``timeout`` s."""
    paths = [str(ROOT / "tests" / f) for f in files if (ROOT / "tests" / f).exists()]
    missing = [f for f in files if not (ROOT / "tests" / f).exists()]
    name = "pytest " + " ".join(Path(p).name for p in paths) + f" -k '{select}'"
    if not paths:
        ck.add(section="tests", name=name, status="ERROR", reason=f"no test files found: {files}")
        return
    cmd = [sys.executable, "-m", "pytest", *paths, "-k", select, "-q", "-p", "no:cacheprovider", "--durations=10"]
    if ck.dry_run:
        cmd.append("--collect-only")  # the interpreter would take many minutes: prove the plumbing only
    elif importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(TEST_WORKERS)]  # compiling the kernels' variants dominates: spread it over CPU cores
    # Correctness, not tuning: each autotuned kernel runs its first config (the benchmarks below tune, and
    # validate the configs that win), else every new test shape would compile and time every config.
    env = {**os.environ, AUTOTUNE_ENV: "first"}
    print(f"[tests] {name} (cap {timeout:.0f} s)", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=max(timeout, 1))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and anything it started: our own process group
        output, _ = proc.communicate()
        timed_out = True
    lines = [ln for ln in output.splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|errors?|tests? collected)", ln)), "")
    status = "TIMEOUT" if timed_out else ("OK" if proc.returncode == 0 else "FAIL")
    ck.add(
        section="tests",
        name=name,
        status=status,
        returncode=proc.returncode,
        seconds=time.monotonic() - start,
        summary=summary,
        missing_files=missing,
        output_tail="\n".join(lines[-40:]),
    )
    print(f"[tests] {status}: {summary or '(no summary)'} in {time.monotonic() - start:.0f} s", flush=True)
    if status != "OK":
        print("\n".join(lines[-25:]), flush=True)


def section_copy(ck: Check) -> None:
    """The two ceilings, measured: device copy bandwidth (read + write) of a large ``copy_``, the roofline for
    memory-bound kernels, and a large square matmul through cuBLAS, the one for compute-bound ones."""
    import torch

    n = ck.shapes.copy_bytes
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=ck.device)
    dst = torch.empty_like(src)
    row = bench_case(
        ck,
        "copy",
        f"torch copy {n >> 20} MiB",
        ours=lambda: dst.copy_(src),
        peer=lambda: dst.copy_(src),
        check=lambda: (float(not torch.equal(dst.copy_(src), src)), 0.5),
        nbytes=2 * n,
    )
    ck.copy_gbps = row.get("gbps")
    if ck.copy_gbps:
        row.update(pct_copy_bw=100.0, pct_roofline=100.0)
    m = ck.shapes.matmul_size
    a, b = _randn(ck, m, m), _randn(ck, m, m)
    row = bench_case(
        ck,
        "copy",
        f"torch matmul {m}^3",
        ours=lambda: a @ b,
        peer=lambda: a @ b,
        check=lambda: (rel_err(a @ b, a.float() @ b.float()), _tol(ck)),
        flops=2.0 * m**3,
    )
    ck.matmul_tflops = row.get("tflops")


def section_layernorm(ck: Check) -> None:
    import torch.nn.functional as F

    from kernels.layernorm import layer_norm

    eps = 1e-5
    for rows, d in ck.shapes.ln_shapes:
        x, r = _randn(ck, rows, d), _randn(ck, rows, d)
        w, b = _randn(ck, d, scale=0.1) + 1, _randn(ck, d, scale=0.1)
        for res in (None, r):

            def check(x=x, w=w, b=b, res=res, d=d):
                y, h = layer_norm(x, w, b, eps, res)
                h_ref = x.float() if res is None else x.float() + res.float()
                err_h = 0.0 if res is None else rel_err(h, h_ref)  # the new residual stream
                return max(rel_err(y, F.layer_norm(h_ref, (d,), w.float(), b.float(), eps)), err_h), _tol(ck)

            def fresh(x=x, w=w, b=b, res=res, d=d):  # the same op over copies of the rows (see time_pair)
                x2, r2 = x.clone(), None if res is None else res.clone()

                def torch_ln():  # the residual add, then LayerNorm
                    h = x2 if r2 is None else x2 + r2
                    return F.layer_norm(h, (d,), w, b, eps), h

                return lambda: layer_norm(x2, w, b, eps, r2), torch_ln

            ours, peer = fresh()
            moved = (2 if res is None else 4) * rows * d * x.element_size()  # x (+r) in, y (+h) out
            bench_case(
                ck,
                "layernorm",
                f"layer_norm{'' if res is None else '+residual'} {rows}x{d}",
                ours=ours,
                peer=peer,
                check=check,
                nbytes=moved,
                copies=(fresh, moved // 2),
                rows=rows,
                width=d,
            )
        del x, r


def section_gelu(ck: Check) -> None:
    import torch.nn.functional as F

    from kernels.gelu import gelu

    s = ck.shapes
    x = _randn(ck, s.gelu_rows, s.d_ff)

    def fresh():  # the same op over a copy of x (see time_pair)
        x2 = x.clone()
        return lambda: gelu(x2), lambda: F.gelu(x2, approximate="tanh")

    ours, peer = fresh()
    bench_case(
        ck,
        "gelu",
        f"gelu {s.gelu_rows}x{s.d_ff}",
        ours=ours,
        peer=peer,
        check=lambda: (rel_err(ours(), F.gelu(x.float(), approximate="tanh")), _tol(ck)),
        nbytes=2 * x.numel() * x.element_size(),
        copies=(fresh, x.nbytes),
    )


def _layer_operands(ck: Check, m: int, k: int, n: int, has_bias: bool, has_res: bool):
    """Random weight ``[N, K]`` (1/sqrt(K) scale), bias, activations ``[M, K]`` and residual of one linear layer."""
    w = _randn(ck, n, k, scale=k**-0.5)
    bias = _randn(ck, n, scale=0.1) if has_bias else None
    return w, bias, _randn(ck, m, k), _randn(ck, m, n) if has_res else None


def _linear_pair(ck: Check, x, w, bias, act, res, ours_fn, peer_fn):
    """``(ours, peer, fresh, check)`` for one linear layer, each side called as ``fn(x, w, bias, act, res)``:
    ``fresh()`` builds such a pair over a copy of the weight (see :func:`time_pair`), and ``check`` validates
    ours against :func:`_linear_ref`."""

    def fresh():
        w2 = w.clone()
        return lambda: ours_fn(x, w2, bias, act, res), lambda: peer_fn(x, w2, bias, act, res)

    ours, peer = fresh()
    return ours, peer, fresh, lambda: (rel_err(ours(), _linear_ref(x, w, bias, act, res)), _tol(ck))


def _linear_ref(x, w, bias, act, res):
    """float32 reference of the fused linear."""
    import torch.nn.functional as F

    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    if act == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    if res is not None:
        y = y + res.float()
    return y


def _torch_linear(x, w, bias, act, res):
    """The peer: cuBLAS GEMM (bias fused by addmm) then torch's separate GELU and residual add."""
    import torch
    import torch.nn.functional as F

    y = torch.addmm(bias, x, w.t()) if bias is not None else torch.mm(x, w.t())
    if act == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    if res is not None:
        y = y + res
    return y


def section_linear(ck: Check) -> None:
    from kernels.linear import linear

    s = ck.shapes
    for m in s.linear_m:
        for name, k, n, has_bias, act, has_res in s.layers():
            w, bias, x, res = _layer_operands(ck, m, k, n, has_bias, has_res)
            elt = x.element_size()
            ours, peer, fresh, check = _linear_pair(ck, x, w, bias, act, res, linear, _torch_linear)
            bench_case(
                ck,
                "linear",
                f"{name} M={m} K={k} N={n}",
                ours=ours,
                peer=peer,
                check=check,
                flops=2.0 * m * n * k,
                nbytes=(n * k + m * k + m * n * (2 if has_res else 1)) * elt,
                copies=(fresh, w.nbytes),
                m=m,
                layer=name,
            )
            del w, x, res


def _tensor_fields(obj) -> dict:
    """The tensor fields of a dataclass (a quantized weight's codes, scales, zero points)."""
    import torch

    fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return {name: v for name, v in fields.items() if isinstance(v, torch.Tensor)}


def _clone_tensors(obj):
    """A copy of a quantized weight with its own storage."""
    return dataclasses.replace(obj, **{name: t.clone() for name, t in _tensor_fields(obj).items()})


def section_quant(ck: Check) -> None:
    import torch

    from kernels.quant import quant_linear, quantize_int4, quantize_int8

    s = ck.shapes
    for name, k, n, has_bias, act, has_res in s.layers():
        w = _randn(ck, n, k, scale=k**-0.5)
        bias = _randn(ck, n, scale=0.1) if has_bias else None
        for bits, quantize in ((8, quantize_int8), (4, quantize_int4)):
            qw = quantize(w)
            w_deq = qw.dequantize(torch.float32)  # the reference multiplies by exactly the stored weight
            wbytes = sum(t.nbytes for t in _tensor_fields(qw).values())
            for m in s.quant_m:
                x = _randn(ck, m, k)
                res = _randn(ck, m, n) if has_res else None

                def fresh(x=x, qw=qw, w=w, bias=bias, act=act, res=res):  # copies of both weights (see time_pair)
                    q2, w2 = _clone_tensors(qw), w.clone()
                    return lambda: quant_linear(x, q2, bias, act, res), lambda: _torch_linear(x, w2, bias, act, res)

                ours, peer = fresh()  # the peer is the fp16 model: cuBLAS on the unquantized weight, torch epilogue
                bench_case(
                    ck,
                    "quant",
                    f"int{bits} {name} M={m} K={k} N={n}",
                    ours=ours,
                    peer=peer,
                    check=lambda ours=ours, x=x, w_deq=w_deq, bias=bias, act=act, res=res: (
                        rel_err(ours(), _linear_ref(x, w_deq, bias, act, res)),
                        _tol(ck),
                    ),
                    flops=2.0 * m * n * k,
                    nbytes=wbytes + (m * k + m * n) * x.element_size(),
                    copies=(fresh, wbytes),
                    m=m,
                    bits=bits,
                    layer=name,
                )
            del qw, w_deq


def section_prefill(ck: Check) -> None:
    import torch
    import torch.nn.functional as F

    from kernels.attention import prefill_attention

    s = ck.shapes
    (bsz, seq), h, hd = s.prefill, s.heads, s.head_dim
    t = bsz * seq
    scale = hd**-0.5
    qkv = _randn(ck, t, 3, h, hd)  # the fused QKV projection's output: q, k, v are strided views of it
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    cu = torch.arange(0, t + 1, seq, dtype=torch.int32, device=ck.device)

    def heads_first(x):  # (T, H, hd) -> (B, H, S, hd) view, no copy
        return x.view(bsz, seq, h, hd).transpose(1, 2)

    qs, ks, vs = heads_first(q), heads_first(k), heads_first(v)
    ref = F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), is_causal=True, scale=scale)
    # The engine's prefill also stores K/V in the paged cache, in the same pass: timed against SDPA + index_copy_.
    num_blocks = -(-t // s.block_size) + 1
    k_cache, v_cache = _randn(ck, num_blocks, s.block_size, h, hd), _randn(ck, num_blocks, s.block_size, h, hd)
    slots = torch.randperm(num_blocks * s.block_size, device=ck.device)[:t]
    for store in (False, True):
        cache = (k_cache, v_cache, slots) if store else None

        def check(cache=cache):
            err = rel_err(heads_first(prefill_attention(q, k, v, cu, seq, scale, kv_cache=cache)), ref)
            if cache is not None:
                stored = k_cache.view(-1, h, hd)[slots], v_cache.view(-1, h, hd)[slots]
                err = max(err, float(not (torch.equal(stored[0], k) and torch.equal(stored[1], v))))
            return err, _tol(ck)

        def peer(store=store):
            if store:
                _torch_store(k, v, k_cache, v_cache, slots)
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)

        bench_case(
            ck,
            "prefill",
            f"prefill{'+store_kv' if store else ''} {bsz}x{seq} H={h} hd={hd}",
            ours=lambda cache=cache: prefill_attention(q, k, v, cu, seq, scale, kv_cache=cache),
            peer=peer,
            check=check,
            flops=4.0 * bsz * h * seq * seq * hd / 2,  # QK^T and PV, causal half
            batch=bsz,
            seq=seq,
            store_kv=store,
        )


def _paged_cache(ck: Check, bsz: int, ctx: int):
    """A paged K/V cache holding ``bsz`` sequences of ``ctx`` tokens in shuffled blocks."""
    import torch

    s = ck.shapes
    per_seq = -(-ctx // s.block_size)
    num_blocks = bsz * per_seq + 3  # a few spare blocks nobody reads
    k_cache = _randn(ck, num_blocks, s.block_size, s.heads, s.head_dim)
    v_cache = _randn(ck, num_blocks, s.block_size, s.heads, s.head_dim)
    tables = torch.randperm(num_blocks, device=ck.device)[: bsz * per_seq].view(bsz, per_seq).to(torch.int32)
    lens = torch.full((bsz,), ctx, dtype=torch.int32, device=ck.device)
    return k_cache, v_cache, tables.contiguous(), lens


def _decode_case(ck: Check, bsz: int):
    """Queries, a paged cache of ``bsz`` full contexts, and the float32 reference output (TorchOps' gather + SDPA)."""
    from engine.ops import TorchOps

    s = ck.shapes
    k_cache, v_cache, tables, lens = _paged_cache(ck, bsz, s.decode_ctx)
    q = _randn(ck, bsz, s.heads, s.head_dim)
    ref = TorchOps().decode_attention(
        q.float(), k_cache.float(), v_cache.float(), tables, lens, s.decode_ctx, s.head_dim**-0.5
    )
    return q, k_cache, v_cache, tables, lens, ref


def section_decode(ck: Check) -> None:
    import torch.nn.functional as F

    from kernels.paged_attention import decode_attention

    s = ck.shapes
    ctx, h, hd = s.decode_ctx, s.heads, s.head_dim
    scale = hd**-0.5
    for bsz in s.decode_batch:
        q, k_cache, v_cache, tables, lens, ref = _decode_case(ck, bsz)
        # The peer reads a contiguous copy of each sequence's cache (gathered once, outside the timing).
        keys = k_cache[tables.long()].flatten(1, 2)[:, :ctx].permute(0, 2, 1, 3).contiguous()  # (B, H, S, hd)
        values = v_cache[tables.long()].flatten(1, 2)[:, :ctx].permute(0, 2, 1, 3).contiguous()

        def fresh(q=q, kc=k_cache, vc=v_cache, t=tables, ln=lens, kk=keys, vv=values):  # copies of both caches
            kc, vc, kk, vv = kc.clone(), vc.clone(), kk.clone(), vv.clone()
            return (
                lambda: decode_attention(q, kc, vc, t, ln, ctx, scale),
                lambda: F.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, scale=scale),
            )

        ours, peer = fresh()
        bench_case(
            ck,
            "decode",
            f"decode B={bsz} ctx={ctx} bs={s.block_size}",
            ours=ours,
            peer=peer,
            check=lambda ours=ours, ref=ref: (rel_err(ours(), ref), _tol(ck)),
            flops=4.0 * bsz * h * ctx * hd,
            nbytes=2 * bsz * ctx * h * hd * q.element_size(),  # every cached K and V read once
            copies=(fresh, keys.nbytes + values.nbytes),
            batch=bsz,
            ctx=ctx,
        )
        del k_cache, v_cache, keys, values


def section_decode_configs(ck: Check) -> None:
    """Every shipped launch shape of the decode kernel timed against the default (x > 1: a better default)."""
    from kernels.paged_attention import configs_for, decode_attention, default_config

    s = ck.shapes
    ctx, scale = s.decode_ctx, s.head_dim**-0.5
    default = default_config(ck.dtype)
    for bsz in s.decode_batch:
        q, k_cache, v_cache, tables, lens, ref = _decode_case(ck, bsz)
        for cfg in configs_for(ck.dtype):
            if cfg == default:
                continue

            def fresh(q=q, kc=k_cache, vc=v_cache, t=tables, ln=lens, cfg=cfg):  # copies of the caches
                kc, vc = kc.clone(), vc.clone()
                return (
                    lambda: decode_attention(q, kc, vc, t, ln, ctx, scale, config=cfg),
                    lambda: decode_attention(q, kc, vc, t, ln, ctx, scale, config=default),
                )

            ours, peer = fresh()
            bench_case(
                ck,
                "decode_cfg",
                f"B={bsz} N{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages} vs default",
                ours=ours,
                peer=peer,
                check=lambda ours=ours, ref=ref: (rel_err(ours(), ref), _tol(ck)),
                nbytes=2 * bsz * ctx * s.heads * s.head_dim * q.element_size(),  # every cached K and V read once
                copies=(fresh, 2 * k_cache.nbytes),
                batch=bsz,
                config=dataclasses.asdict(cfg),
            )
        del k_cache, v_cache


SPLITS = (1, 2, 4, 8, 16)


def section_splitk(ck: Check) -> None:
    """Forced split-K depths of M=1 (decode) GEMMs timed against the launcher's own pick (x > 1: a better pick)."""
    from kernels.linear import choose_split_k, linear, sm_count

    s = ck.shapes
    m = 1
    for name, k, n, has_bias, act, has_res in s.layers():
        w, bias, x, res = _layer_operands(ck, m, k, n, has_bias, has_res)
        pick = choose_split_k(m, n, k, sm_count(x.device), x.dtype)
        for split in SPLITS:
            if split == pick or k // split < 64:
                continue
            forced = functools.partial(linear, split_k=split)
            ours, peer, fresh, check = _linear_pair(ck, x, w, bias, act, res, forced, linear)
            bench_case(
                ck,
                "splitk",
                f"{name} M={m} N={n} K={k} split {split} vs {pick}",
                ours=ours,
                peer=peer,
                check=check,
                nbytes=w.nbytes,
                copies=(fresh, w.nbytes),
                layer=name,
                split=split,
                pick=pick,
            )
        del w, x, res


ENGINES = {  # label -> LLM arguments
    "triton": dict(backend="triton"),  # CUDA-graph decode on a GPU
    "triton-eager": dict(backend="triton", enforce_eager=True),
    "torch": dict(backend="torch"),  # cuBLAS + SDPA, eager (not capturable)
}
# (ours, peer): the shipped engine against both peers, and both eager engines against each other
ENGINE_PAIRS = (("triton", "torch"), ("triton", "transformers"), ("triton-eager", "torch"))


def section_engine(ck: Check) -> None:
    """End to end: greedy decode tokens/s of the engine with the Triton backend (CUDA graphs, and eager) against
    the same engine with the torch backend and transformers' ``generate``, on random GPT-2 Medium weights.

    Validated first: log-probs of the prompts through each engine (``score``) against transformers in float32,
    within twice the error of transformers itself in the benchmark dtype.
    """
    import torch
    from bench_decode import build, decode_rate, ours, theirs

    s = ck.shapes
    vocab = s.engine_model.get("vocab_size", 50257)
    hf32, llms = build(s.engine_model, str(ck.device), _dtype_name(ck), ENGINES, max(s.engine_batch))
    hf = copy.deepcopy(hf32).to(ck.dtype)
    ids = torch.randint(0, vocab, (max(s.engine_batch), s.engine_prompt)).tolist()

    def hf_logprobs(model) -> torch.Tensor:
        x = torch.tensor(ids, device=ck.device)
        with torch.inference_mode():
            logp = model(x).logits[:, :-1].double().log_softmax(-1)
        return logp.gather(2, x[:, 1:, None]).flatten().cpu()

    ref = hf_logprobs(hf32)
    errs = {"transformers": rel_err(hf_logprobs(hf), ref)}
    tol = max(2 * errs["transformers"], 1e-6)
    for label, llm in llms.items():
        errs[label] = rel_err(torch.tensor([v for o in llm.score(ids) for v in o.logprobs]), ref)
    del hf32
    gens = {label: ours(llm) for label, llm in llms.items()} | {"transformers": theirs(hf)}
    for bsz in s.engine_batch:
        rates = {}
        for label, fn in gens.items():
            if ck.left() > 0 and errs[label] <= tol:
                fn(ids[:bsz], 2)  # warm-up: autotuning, CUDA-graph capture of this batch's bucket
                rates[label] = decode_rate(fn, ids[:bsz], s.engine_new_tokens, s.engine_repeats)
        for mine, peer in ENGINE_PAIRS:
            row = dict(section="engine", name=f"decode B={bsz} {mine} vs {peer}", batch=bsz, rel_err=errs[mine],
                       tol=tol, peer_rel_err=errs[peer])  # fmt: skip
            if not errs[mine] <= tol:
                row.update(status="FAIL", reason=f"log-prob rel err {errs[mine]:.3g} > tol {tol:.3g}")
            elif mine not in rates or peer not in rates:
                row.update(status="SKIP", reason="time budget spent, or the peer failed validation")
            elif not rates[mine] > 0 or not rates[peer] > 0:  # nan: generating N tokens took no longer than 1
                row.update(status="SKIP", reason="decode time lost in timing noise (too few new tokens?)")
            else:
                t_ours, t_peer = bsz / rates[mine], bsz / rates[peer]  # seconds per decode step
                row.update(status="OK", ours_tok_s=rates[mine], peer_tok_s=rates[peer], speedup=t_peer / t_ours)
                row.update(ours_ms=1e3 * t_ours, peer_ms=1e3 * t_peer, method="wallclock, greedy generate")
            ck.add(**row)
            if row["status"] == "OK":
                result = f"{rates[mine]:8.0f} vs {rates[peer]:8.0f} tok/s  x{row['speedup']:.2f}"
            else:
                result = row["status"] + " " + row["reason"]
            print(f"  engine   {row['name']:40s} {result}  err {errs[mine]:.1e} (tol {tol:.1e})", flush=True)


def autotune_picks() -> dict[str, dict[str, str]]:
    """The config each autotuned kernel chose, per key: what to ship as defaults, read back after a GPU run."""
    picks = {}
    for module, attr in (
        ("linear", "_linear_kernel"),
        ("quant", "_int8_linear_kernel"),
        ("quant", "_int4_linear_kernel"),
        ("attention", "_prefill_attention_kernel"),
        ("context_attention", "_context_attention_kernel"),
    ):
        kernel = getattr(importlib.import_module(f"kernels.{module}"), attr)
        picks[attr.strip("_")] = {str(key): str(cfg) for key, cfg in getattr(kernel, "cache", {}).items()}
    return picks


def _torch_store(k, v, k_cache, v_cache, slots) -> None:
    """The peer: torch ``index_copy_`` into the flattened caches (every slot is valid here; graph-safe)."""
    idx = slots.long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, idx, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, idx, v)


def section_store_kv(ck: Check) -> None:
    import torch

    from kernels.kv_cache import store_kv

    s = ck.shapes
    h, hd = s.heads, s.head_dim
    for t in s.store_tokens:
        num_blocks = -(-2 * t // s.block_size) + 1
        k_cache = _randn(ck, num_blocks, s.block_size, h, hd)
        v_cache = torch.empty_like(k_cache)
        qkv = _randn(ck, t, 3, h, hd)
        k, v = qkv[:, 1], qkv[:, 2]
        slots = torch.randperm(num_blocks * s.block_size, device=ck.device)[:t].to(torch.int32)

        def check(k=k, v=v, kc=k_cache, vc=v_cache, slots=slots):
            kc.fill_(float("nan"))
            vc.fill_(float("nan"))
            store_kv(k, v, kc, vc, slots)
            got_k, got_v = kc.view(-1, h, hd)[slots.long()], vc.view(-1, h, hd)[slots.long()]
            return max(rel_err(got_k, k.float()), rel_err(got_v, v.float())), 0.0

        bench_case(
            ck,
            "store_kv",
            f"store_kv T={t}",
            ours=lambda k=k, v=v, kc=k_cache, vc=v_cache, sl=slots: store_kv(k, v, kc, vc, sl),
            peer=lambda k=k, v=v, kc=k_cache, vc=v_cache, sl=slots: _torch_store(k, v, kc, vc, sl),
            check=check,
            nbytes=4 * t * h * hd * k.element_size(),
            tokens=t,
        )


# --------------------------------------------------------------------------------------------------- goals


def _geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def goals(rows: list[dict]) -> list[dict]:
    """Score the performance goals from the measured rows (PARTIAL: met on the cases that ran, some did not)."""

    def cases(section: str, pred: Callable[[dict], bool] = lambda r: True) -> list[dict]:
        return [r for r in rows if r["section"] == section and pred(r)]

    def goal(name: str, key: str, reduce: Callable, target: float, unit: str, tried: list[dict]) -> dict:
        good = [r[key] for r in tried if r.get("status") == "OK" and r.get(key) is not None]
        value = reduce(good) if good else None
        if value is None:  # N/A: nothing ran, or it ran without what the goal needs (e.g. no copy section)
            verdict = "ERROR" if tried and not any(r.get("status") == "OK" for r in tried) else "N/A"
        elif value < target:
            verdict = "MISS"
        else:
            verdict = "PASS" if len(good) == len(tried) else "PARTIAL"
        return dict(goal=name, value=value, target=target, unit=unit, verdict=verdict, cases=len(tried))

    decode_big = max((r.get("batch", 0) for r in cases("decode")), default=0)
    return [
        goal("fused linear vs cuBLAS+epilogue (geomean)", "speedup", _geomean, 1.0, "x", cases("linear")),
        goal("prefill attention vs SDPA", "speedup", min, 0.9, "x", cases("prefill", lambda r: not r.get("store_kv"))),
        goal("LayerNorm % of copy BW (large rows)", "pct_copy_bw", min, 80.0, "%", cases("layernorm")),
        goal(
            "paged decode % of copy BW (B>=32, ctx 1024)",
            "pct_copy_bw",
            min,
            70.0,
            "%",
            cases("decode", lambda r: r.get("batch", 0) >= min(32, decode_big)),
        ),
        goal(
            "int8 GEMV M=1 vs fp16 cuBLAS (geomean)",
            "speedup",
            _geomean,
            1.6,
            "x",
            cases("quant", lambda r: r.get("bits") == 8 and r.get("m") == 1),
        ),
        goal(
            "int4 GEMV M=1 vs fp16 cuBLAS (geomean)",
            "speedup",
            _geomean,
            2.5,
            "x",
            cases("quant", lambda r: r.get("bits") == 4 and r.get("m") == 1),
        ),
    ]


def print_summary(ck: Check, scored: list[dict]) -> None:
    """The short table printed last: one line per section, then the goals."""
    print("\n== gpu_check summary " + ("(DRY RUN: interpreter on CPU, timings meaningless) " if ck.dry_run else ""))
    print(f"{ck.meta.get('gpu')} | torch {ck.meta.get('torch')} | triton {ck.meta.get('triton')} | {ck.meta['date']}")
    if ck.copy_gbps or ck.matmul_tflops:
        print(f"ceilings: copy {ck.copy_gbps or 0:.0f} GB/s, matmul {ck.matmul_tflops or 0:.0f} TFLOP/s")
    sections = []
    for r in ck.rows:
        if r["section"] not in sections:
            sections.append(r["section"])
    print(f"{'section':10s} {'cases':>5s} {'ok':>4s} {'bad':>4s}  {'geomean x peer':>14s}  best / worst case")
    for sec in sections:
        rs = [r for r in ck.rows if r["section"] == sec]
        good = [r for r in rs if r.get("status") == "OK"]
        if sec == "tests":
            for r in rs:
                note = r.get("summary") or r.get("reason", "")
                print(
                    f"{sec:10s} {'':>5s} {'':>4s} {'':>4s}  {r['status']:>14s}  {note} ({r['name'].split(' -k ')[-1]})"
                )
            continue
        gm = _geomean([r["speedup"] for r in good])
        by = sorted(good, key=lambda r: r["speedup"])
        ends = f"{by[-1]['name']} x{by[-1]['speedup']:.2f} / {by[0]['name']} x{by[0]['speedup']:.2f}" if by else ""
        gms = f"{gm:.2f}" if gm else "-"
        print(f"{sec:10s} {len(rs):5d} {len(good):4d} {len(rs) - len(good):4d}  {gms:>14s}  {ends}")
    print("\ngoal                                          value     target  verdict")
    for g in scored:
        val = "-" if g["value"] is None else f"{g['value']:.2f}{g['unit']}"
        print(f"{g['goal']:44s} {val:>9s} {g['target']:>7.1f}{g['unit']}  {g['verdict']}")
    print(f"\nrows written to {ck.out_path}")


# ---------------------------------------------------------------------------------------------------- main

SECTIONS = {  # run order: the goals first, the big linear sweep after the quick quant GEMVs, tuning sweeps late
    "copy": section_copy,
    "layernorm": section_layernorm,
    "decode": section_decode,
    "prefill": section_prefill,
    "quant": section_quant,
    "linear": section_linear,
    "engine": section_engine,
    "gelu": section_gelu,
    "decode_cfg": section_decode_configs,
    "splitk": section_splitk,
    "store_kv": section_store_kv,
}


def _check_imports() -> list[str]:
    """Import every kernel module and the op interface; return the failures."""
    from kernels import KERNEL_MODULES  # after main() puts the repository on sys.path

    bad = []
    for mod in ("engine.ops", *(f"kernels.{m}" for m in KERNEL_MODULES)):
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001
            bad.append(f"{mod}: {type(e).__name__}: {e}")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes: code paths only")
    ap.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    ap.add_argument("--tests", nargs="+", default=list(GPU_TESTS), help="test files under tests/ to run first")
    ap.add_argument("--test-timeout", type=float, default=120.0, help="seconds before the test run is killed")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds for the whole check; later cases skip")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS), help="what to time")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--out", default=None, help="JSON path (default <results-dir>/gpu_check_<gpu>_<date>.json)")
    ap.add_argument("--results-dir", default=None, help="folder for the JSON (default bench/results; dry run $TMPDIR)")
    args = ap.parse_args(argv)
    start = time.monotonic()

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    else:
        os.environ.pop("TRITON_INTERPRET", None)  # a stray interpreter switch would time numpy, not the GPU
    sys.path.insert(0, str(ROOT))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        if "TRITON_INTERPRET" not in os.environ:
            os.environ["TRITON_INTERPRET"] = "1"  # so the kernel modules import on a CPU-only machine
        bad = _check_imports()
        verdict = "imports OK" if not bad else "imports FAILED: " + "; ".join(bad)
        print(f"gpu_check needs a CUDA GPU; none found (torch {torch.__version__}). {verdict}. Try --dry-run.")
        return 2

    import triton

    bad = _check_imports()
    now = _dt.datetime.now().astimezone()
    gpu = torch.cuda.get_device_name(0) if not args.dry_run else f"cpu-interpreter ({platform.processor() or 'cpu'})"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    if args.out:
        out_path = Path(args.out)
    else:  # a dry run's numbers mean nothing: they stay out of bench/results unless asked for
        folder = args.results_dir or (os.environ.get("TMPDIR", "/tmp") if args.dry_run else RESULTS)
        out_path = Path(folder) / f"gpu_check_{'dryrun' if args.dry_run else slug}_{now:%Y%m%d-%H%M%S}.json"
    meta = dict(
        gpu=gpu,
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        date=now.isoformat(timespec="seconds"),
        dtype=args.dtype,
        dry_run=args.dry_run,
        import_errors=bad,
    )
    ck = Check(
        device=torch.device("cpu" if args.dry_run else "cuda"),
        dtype=getattr(torch, args.dtype),
        shapes=Shapes.tiny() if args.dry_run else Shapes(),
        dry_run=args.dry_run,
        deadline=start + args.budget,
        out_path=out_path,
        meta=meta,
    )
    print(f"gpu_check on {gpu}: torch {torch.__version__}, triton {triton.__version__}, {args.dtype}", flush=True)
    for b in bad:
        print(f"  import error: {b}", flush=True)
    ck.save()

    def tests(select: str, timeout: float) -> None:
        try:
            section_tests(ck, args.tests, timeout, select)
        except Exception as e:  # noqa: BLE001
            ck.add(section="tests", name=f"pytest -k '{select}'", status="ERROR", reason=f"{type(e).__name__}: {e}")
        ck.save()

    if not args.skip_tests:
        reserve = 0.0 if args.dry_run else 120.0  # keep time for the benchmarks
        tests(f"not {EVERY_CONFIG_TESTS}", min(args.test_timeout, max(ck.left() - reserve, MIN_TEST_SECONDS)))

    torch.manual_seed(0)
    for name in args.sections:
        print(f"[{name}]", flush=True)
        try:
            SECTIONS[name](ck)
        except Exception as e:  # noqa: BLE001 - setup failures (imports, allocation) of one section
            reason = f"{type(e).__name__}: {e}"[:500]
            ck.add(section=name, name=f"{name} setup", status="ERROR", reason=reason, traceback=traceback.format_exc())
            print(f"  {name} setup ERROR {type(e).__name__}: {e}", flush=True)
        finally:
            if not args.dry_run:
                torch.cuda.empty_cache()
        ck.meta["seconds"] = time.monotonic() - start
        ck.meta["autotune"] = autotune_picks()
        ck.meta["ceilings"] = dict(copy_gbps=ck.copy_gbps, matmul_tflops=ck.matmul_tflops)
        ck.save()

    if not args.skip_tests:  # every tile of every autotuned kernel compiled and checked: after the numbers
        if ck.left() >= MIN_TEST_SECONDS:
            tests(EVERY_CONFIG_TESTS, ck.left())
        else:
            reason = f"time budget spent; run: python3 -m pytest tests -k {EVERY_CONFIG_TESTS}"
            ck.add(section="tests", name=f"pytest -k '{EVERY_CONFIG_TESTS}'", status="SKIP", reason=reason)

    scored = goals(ck.rows)
    ck.meta["goals"] = scored
    ck.meta["seconds"] = time.monotonic() - start
    ck.save()
    print_summary(ck, scored)
    broken = [r for r in ck.rows if r.get("status") in ("FAIL", "ERROR", "TIMEOUT")]
    return 1 if broken or bad else 0


if __name__ == "__main__":
    sys.exit(main())
