"""``bench/llama_cpp.py``'s pieces: llama.cpp as a CPU peer, same checkpoint, same run.

``build`` (llama.cpp's tools from the llama-cpp-python source package, cached), ``convert`` (the random-weights
checkpoint to GGUF f32 / f16 / q8_0), ``tools`` (command lines for llama-bench, llama-batched-bench, llama-simple,
llama-tokenize, and parsing what they print), ``greedy`` (llama.cpp's greedy text against our tokens),
``table`` (the pairs, ratios and the printed table).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: engine/ and bench/ live here
RESULTS = ROOT / "bench" / "results"
CACHE = Path.home() / ".cache" / "gpt2-triton" / "llama.cpp"


class LlamaCppError(RuntimeError):
    """A step of the llama.cpp comparison failed; the message says which and what to do."""


class LlamaCppCrash(LlamaCppError):
    """A llama.cpp tool was killed by a signal (a crash, not a refusal)."""


def log(msg: str) -> None:
    """Progress on stderr; stdout holds the table."""
    print(msg, file=sys.stderr, flush=True)
