"""``bench/serve.py``'s pieces: an online serving benchmark against OpenAI-compatible servers.

``workload`` (the requests), ``servers`` (launch, wait, stop; the shared checkpoint), ``client`` (streamed requests,
arrivals, the load loop), ``metrics`` (one run's summary, goodput), ``runner`` (which runs each server gets),
``compare`` (ratios, goals, the offline figure), ``report`` (tables, JSON) and ``plot`` (latency vs throughput).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: engine/ and bench/ live here
RESULTS = ROOT / "bench" / "results"


def log(msg: str) -> None:
    """Progress on stderr; stdout holds the report."""
    print(msg, file=sys.stderr, flush=True)
