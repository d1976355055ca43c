"""CPU decode and prefill of gpt2-triton against llama.cpp: same random-weights checkpoint, same run, as ratios.

    python bench/llama_cpp.py                           # gpt2-medium; f32 / f16 / q8_0; batch 1 and 8; 2 threads
    python bench/llama_cpp.py --model-size gpt2 --dtypes f32 --batches 1 --rounds 1   # a quick look
    python bench/llama_cpp.py --prepare-only            # just build llama.cpp and convert the checkpoint
    python bench/llama_cpp.py --plot bench/results/llama_cpp_*.json   # redraw the PNGs of earlier runs

The first run builds llama.cpp's llama-bench, llama-batched-bench, llama-simple and llama-tokenize from the
llama-cpp-python source package (pip downloads it; cmake; a few minutes on 2 cores) into
~/.cache/gpt2-triton/llama.cpp/<version>/ and writes the checkpoint and its GGUF files (convert_hf_to_gguf.py) under
~/.cache/gpt2-triton/llama.cpp/models/; later runs reuse both. Then: llama.cpp's greedy f32 tokens must equal ours
(validate, then time), and each (ours, llama.cpp) pair is measured in turn, round after round: fp32 vs f32, bf16 and
fp16 vs f16, int8 vs q8_0 (bf16 vs bf16 too with ``--dtypes ... bf16``). llama.cpp's batch 1 is llama-bench (prompt
test ``-p P``; generation test ``-n N`` after ``-d P`` tokens, as our decode runs after the prompt); larger batches
are llama-batched-bench (``-npp P -ntg N -npl B``). llama.cpp runs with its weights repacked (its default: AMX and
interleaved layouts), except a GGUF on which that crashed (0.3.36's AMX q8_0 GEMM segfaults on some AMX Xeons): that
one reruns with ``--repack 0``, and the table and JSON say so. The table goes to stdout, the JSON to bench/results/,
and a PNG of the ratios beside it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cpu_decode import measure_decode  # noqa: E402
from bench.llamacpp import CACHE, RESULTS, LlamaCppCrash, LlamaCppError, log  # noqa: E402
from bench.llamacpp import table as tbl  # noqa: E402
from bench.llamacpp.build import LLAMA_CPP_PYTHON, LlamaCpp, ensure_built  # noqa: E402
from bench.llamacpp.convert import OUTTYPES, checkpoint, to_gguf  # noqa: E402
from bench.llamacpp.greedy import check_greedy  # noqa: E402
from bench.llamacpp.machine import machine_info, slug  # noqa: E402
from bench.llamacpp.plot import plot  # noqa: E402
from bench.llamacpp.tools import batched_argv, bench_argv, parse_batched_bench, parse_llama_bench, run_tool  # noqa: E402

PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-size", default="gpt2-medium", choices=PRESETS, help="GPT-2 preset, random weights")
    ap.add_argument(
        "--dtypes",
        nargs="+",
        default=["f32", "f16", "q8_0"],
        choices=OUTTYPES,
        help="llama.cpp's GGUF types to measure",
    )
    ap.add_argument(
        "--ours",
        nargs="+",
        choices=list(tbl.OURS),
        help="our configurations (default: every one with a peer among --dtypes)",
    )
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's -t and torch's threads")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="every pair measured this many times, interleaved")
    ap.add_argument("--check-tokens", type=int, default=16, help="greedy tokens that must match at f32")
    ap.add_argument("--seed", type=int, default=0, help="the checkpoint's random weights")
    ap.add_argument("--skip-build", action="store_true", help="use the cached llama.cpp build; fail if there is none")
    ap.add_argument("--prepare-only", action="store_true", help="build and convert, measure nothing")
    ap.add_argument(
        "--llama-cpp-python",
        default=LLAMA_CPP_PYTHON,
        metavar="VERSION",
        help="the source package whose vendored llama.cpp is built",
    )
    ap.add_argument("--work-dir", type=Path, help="checkpoint and GGUFs (default: under ~/.cache/gpt2-triton)")
    ap.add_argument("--output-json", type=Path, help="default: bench/results/llama_cpp_<cpu>_<date>.json")
    ap.add_argument("--plot", nargs="+", type=Path, metavar="JSON", help="draw these runs' PNGs beside them, and stop")
    args = ap.parse_args(argv)
    args.plot_results = [read_result(ap, path) for path in args.plot or []]
    for name in ("threads", "prompt_tokens", "rounds", "check_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (decode is timed after the first token)")
    if min(args.batches) < 1:
        ap.error("--batches must be at least 1")
    args.ours = args.ours or tbl.ours_for(args.dtypes)
    args.pairs = tbl.pairs_for(args.ours, args.dtypes)
    if not args.pairs:
        ap.error(f"no pair to compare: ours {args.ours} against llama.cpp {args.dtypes}")
    args.work_dir = args.work_dir or CACHE / "models" / f"{args.model_size}-seed{args.seed}"
    args.unpacked = []  # the GGUF types llama.cpp runs with --repack 0 (see run_llama)
    return args


def read_result(ap: argparse.ArgumentParser, path: Path) -> dict:
    """A JSON this script wrote, or the parser's error (exit 2) naming what is wrong with it."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        ap.error(f"--plot {path}: {e}")
    if not isinstance(result, dict) or not {"rows", "machine", "settings"} <= result.keys():
        ap.error(f"--plot {path}: not a bench/llama_cpp.py result (it needs rows, machine and settings)")
    return result


def measure_llama(llama: LlamaCpp, gguf: Path, batch: int, args) -> dict:
    """llama.cpp's prefill and decode tokens/s for ``batch`` sequences (see the module docstring for which tool)."""
    p, n = args.prompt_tokens, args.new_tokens
    if batch == 1:
        prefill = parse_llama_bench(run_llama(bench_argv, llama, gguf, args, p, 0).decode())
        decode = parse_llama_bench(run_llama(bench_argv, llama, gguf, args, 0, n, depth=p).decode())
        return dict(prefill_tok_s=prefill["prefill_tok_s"], decode_tok_s=decode["decode_tok_s"])
    rates = parse_batched_bench(run_llama(batched_argv, llama, gguf, args, batch, p, n).decode(), batch)
    return dict(prefill_tok_s=rates["prefill_tok_s"], decode_tok_s=rates["decode_tok_s"])


def run_llama(make_argv, llama: LlamaCpp, gguf: Path, args, *test, **options) -> bytes:
    """The output of ``make_argv(llama, gguf, args.threads, *test, repack=..., **options)``: with llama.cpp's weight
    repacking (its AMX and interleaved layouts) unless that crashed on this GGUF before. A crash there (llama.cpp
    0.3.36's AMX GEMM segfaults on q8_0 on some AMX CPUs) reruns it without, and every later run of that GGUF goes
    without (``args.unpacked``, reported with the table)."""
    if gguf.stem not in args.unpacked:
        try:
            return run_tool(make_argv(llama, gguf, args.threads, *test, repack=True, **options))
        except LlamaCppCrash as e:
            reason = str(e).splitlines()[0]
            log(f"llama.cpp crashed on {gguf.name} with its weights repacked ({reason}); measuring it with --repack 0")
            args.unpacked.append(gguf.stem)
    return run_tool(make_argv(llama, gguf, args.threads, *test, repack=False, **options))


def check_parity(llama: LlamaCpp, gguf: Path, hf: Path, args):
    """llama.cpp's greedy f32 tokens against ours from the same prompt ids."""
    from engine import LLM, SamplingParams

    llm = LLM(str(hf), backend="torch", device="cpu", dtype="float32", progress=False)
    tokenizer = llm.get_tokenizer()

    def ours(ids: list[int], n: int) -> list[int]:
        params = SamplingParams(max_tokens=n, temperature=0.0)
        return list(llm.generate([ids], params, use_tqdm=False)[0].outputs[0].token_ids)

    return check_greedy(llama, gguf, ours, tokenizer.token_bytes, llm.config.eos_token_id, args.check_tokens)


def measure_all(llama: LlamaCpp, ggufs: dict[str, Path], hf: Path, args, after_round) -> tuple[dict, str]:
    """Every pair at every batch, ``args.rounds`` times, llama.cpp's side then ours, pair after pair;
    ``after_round(measured, source)`` after each round (the JSON so far, should a later round never end)."""
    source = "bench.cpu_decode.measure_decode"
    measured: dict[tuple[str, str, int], list[dict]] = {}
    for r in range(args.rounds):
        for batch in args.batches:
            done = set()
            for o, p in args.pairs:
                for side, name in (("llama.cpp", p), ("ours", o)):
                    if (side, name) in done:
                        continue
                    done.add((side, name))
                    log(f"round {r + 1}/{args.rounds}, batch {batch}: {side} {name}")
                    if side == "llama.cpp":
                        rates = measure_llama(llama, ggufs[name], batch, args)
                    else:
                        dtype, quantization = tbl.OURS[name]
                        rates = measure_decode(
                            model=str(hf),
                            dtype=dtype,
                            quantization=quantization,
                            batch=batch,
                            prompt_tokens=args.prompt_tokens,
                            new_tokens=args.new_tokens,
                        )
                    log(f"  prefill {rates['prefill_tok_s']:.1f} tok/s, decode {rates['decode_tok_s']:.1f} tok/s")
                    measured.setdefault((side, name, batch), []).append({k: float(rates[k]) for k in tbl.RATES})
        after_round(measured, source)
    return measured, source


def jsonable(obj):
    """NaN / infinite floats as null (JSON has neither)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


def write_json(path: Path, result: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(result), indent=2) + "\n")
    return path


def run(args) -> int:
    import torch

    llama = ensure_built(args.llama_cpp_python, skip_build=args.skip_build)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    hf = checkpoint(args.work_dir, args.model_size, args.seed)
    ggufs = {t: to_gguf(llama, hf, t, args.work_dir) for t in dict.fromkeys(["f32", *args.dtypes])}
    if args.prepare_only:
        log(f"prepared: llama.cpp in {llama.bin}, GGUFs in {args.work_dir}")
        return 0
    torch.set_num_threads(args.threads)
    machine = machine_info()
    commit = llama.commit()
    print(
        f"gpt2-triton vs llama.cpp ({commit[:10] or '?'}, llama-cpp-python {llama.version}) on {machine['cpu']} "
        f"({', '.join(machine['cpu_features'])}), {machine['cores']} cores; torch {machine['versions'].get('torch')}; "
        f"{machine['date']}, commit {machine['git_commit'][:10]}"
    )
    print(
        f"{args.model_size}, random weights (seed {args.seed}); prompt {args.prompt_tokens}, {args.new_tokens} new "
        f"tokens, {args.threads} threads; medians of {args.rounds} interleaved rounds"
    )
    parity = check_parity(llama, ggufs["f32"], hf, args)
    print(f"f32 greedy parity: {parity.describe()}")
    path = args.output_json or RESULTS / f"llama_cpp_{slug(machine['cpu'])}_{_dt.datetime.now():%Y%m%d-%H%M%S}.json"

    def result(measured: dict, source: str, complete: bool) -> dict:
        return dict(
            complete=complete,
            machine=machine,
            llama_cpp=dict(commit=commit, llama_cpp_python=llama.version, without_repack=args.unpacked),
            settings=dict(
                model=args.model_size,
                seed=args.seed,
                prompt_tokens=args.prompt_tokens,
                new_tokens=args.new_tokens,
                threads=args.threads,
                rounds=args.rounds,
                batches=args.batches,
                pairs=args.pairs,
                ours_source=source,
            ),
            parity=dict(ok=parity.ok, detail=parity.describe()),
            rows=tbl.rows(measured, args.pairs, args.batches),
            measurements=[dict(side=s, name=n, batch=b, rounds=v) for (s, n, b), v in measured.items()],
        )

    measured, source = measure_all(
        llama, ggufs, hf, args, lambda m, src: write_json(path, result(m, src, complete=False))
    )
    print(f"ours: {source}; ratio = ours / llama.cpp (above 1: we are faster)\n")
    print(tbl.markdown(tbl.rows(measured, args.pairs, args.batches)))
    if args.unpacked:
        print(f"\nllama.cpp ran {', '.join(args.unpacked)} with --repack 0: its repacked path crashed on this CPU")
    final = result(measured, source, complete=True)
    log(f"wrote {write_json(path, final)}")
    plot(final, path.with_suffix(".png"))
    return 0 if parity.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot:
        for path, result in zip(args.plot, args.plot_results):
            plot(result, path.with_suffix(".png"))
        return 0
    try:
        return run(args)
    except LlamaCppError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
