"""One-shot GPU check: run the CUDA tests, then time every kernel against its PyTorch peer and score the goals.

    python bench/gpu_check.py                    # on a CUDA machine: tests + benchmarks, about 5 minutes
    python bench/gpu_check.py --skip-tests       # benchmarks only
    python bench/gpu_check.py --dry-run          # CPU: every section on tiny shapes under the Triton interpreter

The orchestrator of the pieces in bench/: the device tests (``device_tests.py``), the ceilings and every kernel case
measured by the harness (``harness.py``: validated against the kernel's reference, then ``do_bench`` or CUDA-graph
replays over rotating operand copies), the cases built by the sweep scripts (``kernels/*.py``) at GPT-2 Medium's
shapes, each against one peer (cuBLAS ``addmm`` + torch's epilogue, fp16 cuBLAS for the int8/int4 GEMVs, SDPA,
torch's LayerNorm / GELU / index-put); the engine end to end (``engine_decode.py``); two tuning sweeps (decode
launch configs, split-K depths); last, in what is left of the budget, the tests that compile and check every
autotune config. Rows go to ``bench/results/gpu_check_<gpu>_<date>.json`` (``--results-dir``) after every section,
with the configs the autotuner picked (``gpu_report.py``); the goals below are data, scored from the rows.

Exit codes: 0 all validations (and tests) passed, 1 something was wrong, 2 no CUDA GPU (and not --dry-run).
Performance goals print PASS/MISS but never change the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import device_tests as dt  # noqa: E402
from bench.engine_decode import EngineSizes  # noqa: E402
from bench.gpu_report import (  # noqa: E402
    Goal,
    Report,
    autotune_picks,
    describe_row,
    geomean,
    kernel_modules,
    pair_row,
    print_summary,
    score,
)
from bench.harness import OURS, RESULTS, Bench, environment, measure, measure_ceilings, slug, use_interpreter  # noqa: E402
from bench.kernels import gelu, layernorm, linear, lora, paged_decode, prefill_attention, quant, store_kv  # noqa: E402
from bench.shapes import model_for  # noqa: E402


@dataclass
class Sizes:
    """The fixed cases: GPT-2 Medium's shapes on a GPU, tiny ones for the interpreter's dry run."""

    linear_m: tuple[int, ...] = (1, 16, 64, 512, 4096, 16384)
    quant_m: tuple[int, ...] = (1, 16)
    prefill: tuple[int, int] = (8, 1024)  # batch x tokens per sequence
    decode_batch: tuple[int, ...] = (1, 32, 64)
    decode_ctx: int = 1024
    ln_shapes: tuple[tuple[int, int], ...] = ((16384, 1024), (4096, 8192))  # GPT-2 Medium, the widest supported
    gelu_rows: int = 16384
    store_tokens: tuple[int, ...] = (64, 8192)
    engine: EngineSizes = field(default_factory=EngineSizes)
    lora_rows: tuple[int, ...] = (1, 64, 4096)  # a decode batch, a small and a large prefill

    @classmethod
    def tiny(cls) -> Sizes:
        return cls((1, 17), (1,), (2, 40), (1, 3), 40, ((33, 128), (5, 1600)), 33, (5,), EngineSizes.tiny(), (3,))


def layers(b: Bench):
    return model_for(b.dry_run).layers()


# name -> the section's cases, in run order: the goals first, the big linear sweep after the quick quant GEMVs,
# tuning sweeps late. "copy" (the ceilings) and "engine" (end to end) are measured their own way.
SECTIONS = {
    "copy": None,
    "layernorm": lambda b, d, s: [layernorm.case(b, d, r, w, res) for r, w in s.ln_shapes for res in (False, True)],
    "decode": lambda b, d, s: [paged_decode.case(b, d, n, s.decode_ctx) for n in s.decode_batch],
    "prefill": lambda b, d, s: [prefill_attention.case(b, d, *s.prefill, store) for store in (False, True)],
    "quant": lambda b, d, s: [
        quant.case(b, d, m, lay, bits) for lay in layers(b) for bits in (8, 4) for m in s.quant_m
    ],
    "linear": lambda b, d, s: [linear.case(b, d, m, lay) for m in s.linear_m for lay in layers(b)],
    "engine": None,
    "gelu": lambda b, d, s: [gelu.case(b, d, s.gelu_rows, model_for(b.dry_run).d_ff)],
    "decode_cfg": lambda b, d, s: paged_decode.config_cases(b, d, s.decode_batch, s.decode_ctx),
    "splitk": lambda b, d, s: linear.split_k_cases(b, d, layers(b)),
    "store_kv": lambda b, d, s: [store_kv.case(b, d, t) for t in s.store_tokens],
    "lora": lambda b, d, s: [lora.case(b, d, m, model_for(b.dry_run).d, lora.SLOTS, lora.RANK) for m in s.lora_rows],
}
PAIRS = {"copy": ("torch", "torch"), "decode_cfg": ("triton-config", OURS), "splitk": ("triton-split", OURS)}
GOALS = [
    Goal("fused linear vs cuBLAS+epilogue (geomean)", "linear", "speedup", geomean, 1.0, "x"),
    Goal("prefill attention vs SDPA", "prefill", "speedup", min, 0.9, "x", lambda r, _: not r.get("store_kv")),
    Goal("LayerNorm % of copy BW (large rows)", "layernorm", "pct_copy_bw", min, 80.0, "%"),
    Goal("paged decode % of copy BW (B>=32, ctx 1024)", "decode", "pct_copy_bw", min, 70.0, "%",
         lambda r, rows: r.get("batch", 0) >= min(32, max(x.get("batch", 0) for x in rows))),
    Goal("int8 GEMV M=1 vs fp16 cuBLAS (geomean)", "quant", "speedup", geomean, 1.6, "x",
         lambda r, _: r.get("bits") == 8 and r.get("m") == 1),
    Goal("int4 GEMV M=1 vs fp16 cuBLAS (geomean)", "quant", "speedup", geomean, 2.5, "x",
         lambda r, _: r.get("bits") == 4 and r.get("m") == 1),
]  # fmt: skip


def run_section(name: str, bench: Bench, dtype: torch.dtype, sizes: Sizes, report: Report) -> None:
    """Measure a section's cases (ours against its peer), a row each; the engine section makes its own rows."""
    if name == "engine":
        from bench.engine_decode import engine_rows

        report.rows += engine_rows(bench.device, dtype, sizes.engine, bench.deadline)
        return
    ours, peer = PAIRS.get(name, (OURS, "torch"))
    if name == "copy":
        results = measure_ceilings(bench, [dtype])
    else:
        results = (measure(bench, case, (ours, peer)) for case in SECTIONS[name](bench, dtype, sizes))
    for result in results:
        report.rows.append(pair_row(bench, name, result, ours, peer))
        print(f"  {name:10s} " + describe_row(report.rows[-1]), flush=True)


def check_imports() -> list[str]:
    """Import the op interface and every kernel module; return the failures."""
    bad = []
    for mod in ("engine.ops", "engine.torch_ops", *kernel_modules()):
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001
            bad.append(f"{mod}: {type(e).__name__}: {e}")
    return bad


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes: code paths only")
    ap.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    ap.add_argument("--tests", nargs="+", default=list(dt.GPU_TESTS), help="test files under tests/ to run first")
    ap.add_argument("--test-timeout", type=float, default=120.0, help="seconds before the test run is killed")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds for the whole check; later cases skip")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS), help="what to time")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--out", default=None, help="JSON path (default <results-dir>/gpu_check_<gpu>_<date>.json)")
    ap.add_argument("--results-dir", default=None, help="folder for the JSON (default bench/results; dry run $TMPDIR)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    use_interpreter(args.dry_run)
    if not args.dry_run and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # so the kernel modules import on a CPU-only machine
        bad = check_imports()
        verdict = "imports OK" if not bad else "imports FAILED: " + "; ".join(bad)
        print(f"gpu_check needs a CUDA GPU; none found (torch {torch.__version__}). {verdict}. Try --dry-run.")
        return 2
    bad = check_imports()
    env = environment(args.dry_run)
    if args.out:
        out_path = Path(args.out)
    else:  # a dry run's numbers mean nothing: they stay out of bench/results unless asked for
        folder = args.results_dir or (os.environ.get("TMPDIR", "/tmp") if args.dry_run else RESULTS)
        stamp = env["date"][:19].replace("-", "").replace(":", "").replace("T", "-")
        out_path = Path(folder) / f"gpu_check_{'dryrun' if args.dry_run else slug(env['gpu'])}_{stamp}.json"
    meta = dict(env, dtype=args.dtype, import_errors=bad)
    report = Report(out_path, meta)
    bench = Bench(torch.device("cpu" if args.dry_run else "cuda"), args.dry_run, deadline=start + args.budget)
    dtype, sizes = getattr(torch, args.dtype), Sizes.tiny() if args.dry_run else Sizes()
    print(f"gpu_check on {env['gpu']}: torch {env['torch']}, triton {env['triton']}, {args.dtype}", flush=True)
    for b in bad:
        print(f"  import error: {b}", flush=True)
    report.save()

    def tests(select: str, timeout: float) -> None:
        try:
            report.rows.append(dt.run_tests(args.tests, select, timeout, args.dry_run))
        except Exception as e:  # noqa: BLE001
            report.rows.append(dict(section="tests", name=f"pytest -k '{select}'", status="ERROR",
                                    reason=f"{type(e).__name__}: {e}"))  # fmt: skip
        report.save()

    if not args.skip_tests:
        reserve = 0.0 if args.dry_run else 120.0  # keep time for the benchmarks
        tests(f"not {dt.EVERY_CONFIG_TESTS}", min(args.test_timeout, max(bench.left() - reserve, dt.MIN_TEST_SECONDS)))
    torch.manual_seed(0)
    for name in args.sections:
        print(f"[{name}]", flush=True)
        try:
            run_section(name, bench, dtype, sizes, report)
        except Exception as e:  # noqa: BLE001 - setup failures (imports, allocation) of one section
            report.rows.append(dict(section=name, name=f"{name} setup", status="ERROR", reason=f"{type(e).__name__}: "
                                    f"{e}"[:500], traceback=traceback.format_exc()))  # fmt: skip
            print(f"  {name} setup ERROR {type(e).__name__}: {e}", flush=True)
        finally:
            if not args.dry_run:
                torch.cuda.empty_cache()
        meta.update(seconds=time.monotonic() - start, autotune=autotune_picks())
        meta["ceilings"] = dict(copy_gbps=bench.copy_gbps, matmul_tflops=bench.matmul_tflops.get(args.dtype))
        report.save()
    if not args.skip_tests:  # every tile of every autotuned kernel compiled and checked: after the numbers
        if bench.left() >= dt.MIN_TEST_SECONDS:
            tests(dt.EVERY_CONFIG_TESTS, bench.left())
        else:
            reason = f"time budget spent; run: python3 -m pytest tests -k {dt.EVERY_CONFIG_TESTS}"
            report.rows.append(dict(section="tests", name=f"pytest -k '{dt.EVERY_CONFIG_TESTS}'", status="SKIP",
                                    reason=reason))  # fmt: skip
    meta.update(goals=score(GOALS, report.rows), seconds=time.monotonic() - start)
    report.save()
    print_summary(report, bench, meta["goals"])
    broken = [r for r in report.rows if r.get("status") in ("FAIL", "ERROR", "TIMEOUT")]
    return 1 if broken or bad else 0


if __name__ == "__main__":
    sys.exit(main())
