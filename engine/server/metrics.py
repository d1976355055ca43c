"""``GET /metrics``: Prometheus text under a ``gpt2_triton:`` prefix, mirroring vLLM's names.

Engine-wide numbers (running and waiting requests, KV-cache use, prefix-cache, token and speculative-decoding
totals, preemptions) are read from the engine's last stats at scrape time; per-request ones (successes by finish
reason, time to first token, time per output token, end-to-end latency) are recorded as requests finish. Each app
has its own registry, so several servers (tests) never share counters. Under Ray Serve, :func:`merge_expositions`
joins every replica's text into one, each sample labelled with its replica.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from engine.async_llm import AsyncLLM
from engine.outputs import RequestOutput

PREFIX = "gpt2_triton:"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)


class _EngineCollector:
    """The engine's stats as gauges and counters, read when Prometheus scrapes."""

    def __init__(self, llm: AsyncLLM) -> None:
        self.llm = llm

    def collect(self):
        s = self.llm.get_stats()
        gauges = {
            "num_requests_running": ("sequences the scheduler is running", s.num_running),
            "num_requests_waiting": ("sequences waiting to be scheduled", s.num_waiting),
            "kv_cache_usage_perc": ("fraction of KV-cache blocks in use, 0 to 1", s.kv_cache_usage),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        counters = {
            "prefix_cache_queries": ("prompt tokens looked up in the prefix cache", s.prefix_cache_queries),
            "prefix_cache_hits": ("prompt tokens served from the prefix cache", s.prefix_cache_hits),
            "num_preemptions": ("sequences preempted (recomputed later)", s.num_preemptions),
            "prompt_tokens": ("prompt tokens of the requests added", s.prompt_tokens),
            "generation_tokens": ("tokens generated", s.generation_tokens),
            "spec_decode_num_drafts": ("sequence steps that fed speculative drafts", s.spec_decode_num_drafts),
            "spec_decode_num_draft_tokens": ("speculative draft tokens fed", s.spec_decode_num_draft_tokens),
            "spec_decode_num_accepted_tokens": ("of those, drafts accepted", s.spec_decode_num_accepted_tokens),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(PREFIX + name, doc, value=value)
        if s.spec_decode_num_accepted_tokens_per_pos:  # vLLM's: how far into the drafts acceptance reaches
            doc = "drafts accepted at each position after the token"
            per_pos = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos", doc, labels=["position"])
            for position, value in enumerate(s.spec_decode_num_accepted_tokens_per_pos):
                per_pos.add_metric([str(position)], value)
            yield per_pos
        yield self._cache_config()
        if s.max_lora:  # vLLM's info gauge: the adapters in use as labels, the time of the reading as the value
            info = GaugeMetricFamily(PREFIX + "lora_requests_info", "LoRA adapters of the running and waiting requests",
                                     labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])  # fmt: skip
            labels = [str(s.max_lora), ",".join(s.running_lora_adapters), ",".join(s.waiting_lora_adapters)]
            info.add_metric(labels, time.time())
            yield info

    def _cache_config(self) -> GaugeMetricFamily:
        """vLLM's ``cache_config_info``: the KV cache's configuration as labels (value 1), the size of the pool
        whose use ``kv_cache_usage_perc`` gives."""
        engine = self.llm.engine
        labels = {"block_size": engine.block_size, "cache_dtype": str(engine.dtype).removeprefix("torch."),
                  "enable_prefix_caching": engine.blocks.enable_prefix_caching,
                  "num_gpu_blocks": engine.blocks.num_blocks}  # fmt: skip
        info = GaugeMetricFamily(PREFIX + "cache_config_info", "the KV cache's configuration", labels=list(labels))
        info.add_metric([str(v) for v in labels.values()], 1.0)
        return info


class Metrics:
    def __init__(self, llm: AsyncLLM) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(llm))
        kw = dict(registry=self.registry)
        self.request_success = Counter(PREFIX + "request_success", "completions finished, by finish reason",
                                       ["finished_reason"], **kw)  # fmt: skip
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "arrival to first token",
                              buckets=LATENCY_BUCKETS, **kw)  # fmt: skip
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "time per output token after the first",
                              buckets=TOKEN_BUCKETS, **kw)  # fmt: skip
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "arrival to finish", buckets=LATENCY_BUCKETS, **kw)

    def observe(self, out: RequestOutput, num_tokens: list[int] | None = None) -> None:
        """Record one finished request; ``num_tokens``: each completion's token count, when ``out`` holds only the
        last of them (a stream's delta)."""
        for c in out.outputs:
            self.request_success.labels(finished_reason=c.finish_reason or "abort").inc()
        m = out.metrics
        if m is None or m.first_token_time is None or m.finished_time is None:
            return
        self.ttft.observe(m.first_token_time - m.arrival_time)
        self.e2e.observe(m.finished_time - m.arrival_time)
        tokens = max(num_tokens if num_tokens is not None else [len(c.token_ids) for c in out.outputs])
        if tokens > 1:
            self.tpot.observe((m.finished_time - m.first_token_time) / (tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Merged:
    """A collector that yields already-built metric families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return self.families


def merge_expositions(texts: dict[str, bytes], label: str = "replica") -> bytes:
    """One Prometheus exposition from several (by source name): each family once, its samples from every source
    with ``label="<source>"`` added."""
    families: dict[str, Metric] = {}
    for source, text in texts.items():
        for family in text_string_to_metric_families(text.decode()):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            merged.samples += [s._replace(labels={**s.labels, label: source}) for s in family.samples]
    registry = CollectorRegistry()
    registry.register(_Merged(list(families.values())))
    return generate_latest(registry)
