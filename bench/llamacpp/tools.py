"""Command lines for llama.cpp's tools, and what they print turned into rates.

``llama-bench -o json`` prints a JSON list with one object per test (``n_prompt``, ``n_gen``, ``n_depth``,
``avg_ts``, ``samples_ts``, ...); ``llama-batched-bench`` prints a markdown table (``|PP|TG|B|N_KV|T_PP s|S_PP t/s|
T_TG s|S_TG t/s|T s|S t/s|``) or, with ``--output-format jsonl``, one JSON object per row (``pp``, ``tg``, ``pl``,
``speed_pp``, ``speed_tg``, ...).
"""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

from . import LlamaCppCrash, LlamaCppError
from .build import LlamaCpp, tail

BATCHED_COLUMNS = ("pp", "tg", "pl", "n_kv", "t_pp", "speed_pp", "t_tg", "speed_tg", "t", "speed")


def bench_argv(
    llama: LlamaCpp,
    model: Path,
    threads: int,
    n_prompt: int,
    n_gen: int,
    depth: int = 0,
    reps: int = 5,
    repack: bool = True,
) -> list[str]:
    """llama-bench: one test of ``n_prompt`` prompt tokens or ``n_gen`` generated ones after ``depth`` tokens;
    ``repack=False`` keeps the weights as the GGUF stores them (no AMX or repacked layouts)."""
    return [
        str(llama.tool("llama-bench")),
        "-m",
        str(model),
        "-t",
        str(threads),
        "-p",
        str(n_prompt),
        "-n",
        str(n_gen),
        "-d",
        str(depth),
        "-r",
        str(reps),
        "--repack",
        str(int(repack)),
        "-o",
        "json",
    ]


def batched_argv(
    llama: LlamaCpp,
    model: Path,
    threads: int,
    batch: int,
    n_prompt: int,
    n_gen: int,
    reps: int = 3,
    repack: bool = True,
) -> list[str]:
    """llama-batched-bench: ``batch`` sequences of ``n_prompt`` + ``n_gen`` tokens, ``reps`` times (one row each);
    ``repack`` as for :func:`bench_argv`."""
    return [
        str(llama.tool("llama-batched-bench")),
        "-m",
        str(model),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "-c",
        str(batch * (n_prompt + n_gen)),
        "-npp",
        str(n_prompt),
        "-ntg",
        str(n_gen),
        "-npl",
        ",".join([str(batch)] * reps),
        "--output-format",
        "jsonl",
        *([] if repack else ["--no-repack"]),
    ]


def simple_argv(llama: LlamaCpp, model: Path, new_tokens: int, prompt: str) -> list[str]:
    """llama-simple: greedy completion of ``prompt``, printed as text (prompt first) on stdout."""
    return [str(llama.tool("llama-simple")), "-m", str(model), "-n", str(new_tokens), prompt]


def tokenize_argv(llama: LlamaCpp, model: Path, prompt: str) -> list[str]:
    """llama-tokenize: ``prompt``'s token ids as llama.cpp feeds them to the model (special tokens added)."""
    return [str(llama.tool("llama-tokenize")), "-m", str(model), "-p", prompt, "--ids", "--log-disable"]


def run_tool(argv: list[str], timeout: float = 1800) -> bytes:
    """``argv``'s stdout (bytes: llama-simple prints token pieces, not always whole UTF-8); one clear error when it
    fails."""
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise LlamaCppError(f"{Path(argv[0]).name} ran past {timeout:.0f} s") from e
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace")
        error = LlamaCppCrash if done.returncode < 0 else LlamaCppError
        raise error(f"{Path(argv[0]).name} failed (exit {done.returncode}):\n{tail(output)}")
    return done.stdout


def _rate(test: dict) -> float:
    """A llama-bench test's tokens/s: the median of its repetitions (``avg_ts`` when they are missing)."""
    samples = test.get("samples_ts") or []
    return float(statistics.median(samples)) if samples else float(test["avg_ts"])


def parse_llama_bench(text: str) -> dict:
    """llama-bench's ``-o json`` output -> ``prefill_tok_s`` (its prompt test) and ``decode_tok_s`` (its generation
    test), each the median over repetitions, as present; plus ``build_commit`` and ``n_threads``."""
    start = text.find("[")
    if start < 0:
        raise LlamaCppError(f"llama-bench printed no JSON list:\n{tail(text)}")
    try:
        tests = json.loads(text[start:])
    except json.JSONDecodeError as e:
        raise LlamaCppError(f"llama-bench's JSON does not parse ({e}):\n{tail(text)}") from e
    out: dict = {}
    for test in tests:
        if test["n_prompt"] > 0 and test["n_gen"] == 0:
            out["prefill_tok_s"] = _rate(test)
        elif test["n_gen"] > 0 and test["n_prompt"] == 0:
            out["decode_tok_s"] = _rate(test)
        out.setdefault("build_commit", test.get("build_commit", ""))
        out.setdefault("n_threads", test.get("n_threads"))
    return out


def parse_batched_rows(text: str) -> list[dict]:
    """Every result row llama-batched-bench printed, as dicts keyed by ``BATCHED_COLUMNS``: JSON lines with a
    ``pl`` key, or markdown table rows of ten numbers (the header and rule rows are skipped)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"pl"' in line:
            row = json.loads(line)
            rows.append({k: row[k] for k in BATCHED_COLUMNS})
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            try:
                values = [float(c) for c in cells]
            except ValueError:
                continue  # header or rule
            if len(values) == len(BATCHED_COLUMNS):
                rows.append(dict(zip(BATCHED_COLUMNS, values)))
    return rows


def parse_batched_bench(text: str, batch: int) -> dict:
    """``prefill_tok_s`` and ``decode_tok_s`` at ``batch`` sequences: medians over its rows (``S_PP``, ``S_TG``)."""
    rows = [r for r in parse_batched_rows(text) if int(r["pl"]) == batch]
    if not rows:
        raise LlamaCppError(f"llama-batched-bench printed no row for batch {batch}:\n{tail(text)}")
    return dict(
        prefill_tok_s=statistics.median(r["speed_pp"] for r in rows),
        decode_tok_s=statistics.median(r["speed_tg"] for r in rows),
        rows=len(rows),
    )


def parse_token_ids(text: str) -> list[int]:
    """llama-tokenize ``--ids`` output (a Python-style list, ``[15496, 11, 995]``) -> the ids."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end < start:
        raise LlamaCppError(f"llama-tokenize printed no id list:\n{tail(text)}")
    body = text[start + 1 : end].strip()
    return [int(x) for x in body.split(",")] if body else []
