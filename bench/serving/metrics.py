"""One run's figures from its requests: counts, throughputs, goodput under SLOs, latency distributions."""

from __future__ import annotations

from collections import Counter

from .client import RequestResult

# --goodput keys (e2e is accepted for e2el) -> the metric they bound
GOODPUT_KEYS = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2el", "e2el": "e2el"}


def parse_goodput(specs: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50", "e2e:2000"]`` (ms) -> ``{"ttft": 500.0, "tpot": 50.0, "e2el": 2000.0}``."""
    slos = {}
    for spec in specs or []:
        key, sep, value = spec.partition(":")
        if not sep or key.lower() not in GOODPUT_KEYS:
            raise SystemExit(f"--goodput {spec!r}: expected KEY:MS with KEY one of ttft, tpot, e2el (or e2e)")
        try:
            ms = float(value)
        except ValueError:
            raise SystemExit(f"--goodput {spec!r}: {value!r} is not a number of milliseconds") from None
        if ms < 0:
            raise SystemExit(f"--goodput {spec!r}: a negative SLO")
        slos[GOODPUT_KEYS[key.lower()]] = ms
    return slos


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    """Within every SLO (ms). A one-token completion has no TPOT and passes that one, as in vLLM (TPOT 0)."""
    values = {"ttft": r.ttft_s, "tpot": r.tpot_s if r.tpot_s is not None else 0.0, "e2el": r.e2e_s}
    return r.ok and all(values[k] is not None and values[k] * 1e3 <= slo for k, slo in slos.items())


def distribution(values_ms: list[float], percentiles: list[float]) -> dict:
    """count, mean, median, std, min, max and ``p<q>`` for each percentile (numpy's linear interpolation)."""
    import numpy as np

    keys = ["mean", "median", "std", "min", "max"] + [f"p{q:g}" for q in percentiles]
    if not values_ms:
        return {"count": 0, **dict.fromkeys(keys)}
    a = np.asarray(values_ms, dtype=float)
    out = dict(count=len(a), mean=float(a.mean()), median=float(np.median(a)), std=float(a.std()),
               min=float(a.min()), max=float(a.max()))  # fmt: skip
    out.update({f"p{q:g}": float(np.percentile(a, q)) for q in percentiles})
    return out


def latencies(ok: list[RequestResult], percentiles: list[float]) -> dict:
    """TTFT, TPOT, ITL (every gap between text chunks, all requests pooled) and end-to-end latency, in ms."""
    return dict(
        ttft_ms=distribution([r.ttft_s * 1e3 for r in ok if r.ttft_s is not None], percentiles),
        tpot_ms=distribution([r.tpot_s * 1e3 for r in ok if r.tpot_s is not None], percentiles),
        itl_ms=distribution([g * 1e3 for r in ok for g in r.itl_s], percentiles),
        e2el_ms=distribution([r.e2e_s * 1e3 for r in ok], percentiles),
    )


def checks(ok: list[RequestResult]) -> dict:
    """Did every completion run to max_tokens (EOS ignored), did the server see our prompt lengths, and how many
    prompt tokens did its prefix cache serve (None: it does not say)?"""
    cached = [r.server_cached_tokens for r in ok if r.server_cached_tokens is not None]
    return dict(
        full_length=sum(r.output_tokens == r.expected_output_tokens for r in ok),
        output_tokens_from_usage=sum(r.output_tokens_from == "usage" for r in ok),
        prompt_tokens_mismatched=sum(r.server_prompt_tokens not in (None, r.prompt_tokens) for r in ok),
        cached_prompt_tokens=sum(cached) if cached else None,
    )


def summarize(results: list[RequestResult], duration_s: float, percentiles: list[float],
              slos: dict[str, float]) -> dict:  # fmt: skip
    """Everything reported about one run, computed here only. Throughputs count completed requests only."""
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    good = sum(meets_slos(r, slos) for r in ok) if slos else None
    return dict(
        completed=len(ok), failed=len(results) - len(ok),
        errors=dict(Counter(r.error for r in results if not r.ok).most_common(5)),
        duration_s=duration_s, total_input_tokens=prompt_tokens, total_output_tokens=output_tokens,
        request_throughput=len(ok) / duration_s, output_throughput=output_tokens / duration_s,
        total_token_throughput=(prompt_tokens + output_tokens) / duration_s,
        goodput_slos_ms=slos or None, good_requests=good, request_goodput=None if good is None else good / duration_s,
        **checks(ok), **latencies(ok, percentiles),
    )  # fmt: skip
