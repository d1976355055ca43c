"""Which of our configurations faces which llama.cpp type, and the table of ratios from one run's measurements.

A measurement is ``{"prefill_tok_s": .., "decode_tok_s": ..}``; a run keeps each one's rounds and compares medians.
Ratios are ours over llama.cpp's: above 1 means we are faster.
"""

from __future__ import annotations

import math
import statistics

# ours: name -> (LLM dtype, quantization)
OURS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "fp16": ("float16", None), "int8": ("float32", "int8")}
# (ours, llama.cpp's GGUF type): the pairs compared, in table order
PAIRS = (("fp32", "f32"), ("bf16", "f16"), ("fp16", "f16"), ("bf16", "bf16"), ("int8", "q8_0"))
RATES = ("prefill_tok_s", "decode_tok_s")


def pairs_for(ours: list[str], peers: list[str]) -> list[tuple[str, str]]:
    """The pairs whose two sides are both asked for."""
    return [(o, p) for o, p in PAIRS if o in ours and p in peers]


def ours_for(peers: list[str]) -> list[str]:
    """Our configurations that have a peer among the llama.cpp types ``peers``."""
    return [o for o in OURS if any(p in peers for q, p in PAIRS if q == o)]


def median_rates(rounds: list[dict]) -> dict:
    """The median of each rate over a measurement's rounds (NaN ones left out; NaN when none is left)."""
    out = {}
    for key in RATES:
        values = [r[key] for r in rounds if key in r and not math.isnan(r[key])]
        out[key] = statistics.median(values) if values else float("nan")
    return out


def ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs and not math.isnan(theirs) else float("nan")


def rows(measured: dict, pairs: list[tuple[str, str]], batches: list[int]) -> list[dict]:
    """One row per batch and pair from ``measured[(side, name, batch)]`` -> list of rounds, ``side`` being
    "ours" or "llama.cpp"; pairs with a side not measured are left out."""
    out = []
    for batch in batches:
        for o, p in pairs:
            if ("ours", o, batch) not in measured or ("llama.cpp", p, batch) not in measured:
                continue
            a, b = median_rates(measured["ours", o, batch]), median_rates(measured["llama.cpp", p, batch])
            out.append(
                dict(
                    batch=batch,
                    ours=o,
                    llama_cpp=p,
                    rounds=len(measured["ours", o, batch]),
                    ours_prefill=a["prefill_tok_s"],
                    llama_prefill=b["prefill_tok_s"],
                    prefill_ratio=ratio(a["prefill_tok_s"], b["prefill_tok_s"]),
                    ours_decode=a["decode_tok_s"],
                    llama_decode=b["decode_tok_s"],
                    decode_ratio=ratio(a["decode_tok_s"], b["decode_tok_s"]),
                )
            )
    return out


def _num(x: float, digits: int = 1) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def markdown(table: list[dict]) -> str:
    """The rows as the markdown table the README shows."""
    lines = [
        "| batch | ours | llama.cpp | prefill tok/s: ours / llama.cpp | ratio | decode tok/s: ours / llama.cpp "
        "| ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['batch']} | {r['ours']} | {r['llama_cpp']} "
            f"| {_num(r['ours_prefill'])} / {_num(r['llama_prefill'])} | {_num(r['prefill_ratio'], 2)}x "
            f"| {_num(r['ours_decode'])} / {_num(r['llama_decode'])} | {_num(r['decode_ratio'], 2)}x |"
        )
    return "\n".join(lines)
