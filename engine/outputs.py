"""What the API returns: vLLM-shaped generation outputs, scores, stream deltas and engine statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.sequence import RequestMetrics


@dataclass(slots=True)
class CompletionOutput:
    """One completion of a prompt."""

    index: int  # which of the prompt's n completions
    text: str
    token_ids: list[int]
    cumulative_logprob: float  # sum of the sampled tokens' log-probabilities
    finish_reason: str | None  # "stop" (EOS, stop token or stop string) or "length"
    logprobs: list[dict[int, float]] | None = None  # per token: sampled token + top alternatives
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it, if any


@dataclass(slots=True)
class RequestOutput:
    """All completions of one prompt: final from ``LLM.generate``, or so far from ``LLMEngine.step``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    prompt_logprobs: list[dict[int, float] | None] | None = None  # per prompt token (None for the first), when asked
    metrics: RequestMetrics | None = None  # arrival, first-scheduled, first-token and finish times


@dataclass
class StreamDelta:
    """New text of one completion since the previous delta (``finish_reason`` set on its last delta)."""

    prompt_index: int
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class ScoreOutput:
    """Log-likelihood of a text under the model."""

    token_ids: list[int]
    logprobs: list[float]  # log p(token_i | tokens before it) for i = 1 .. n-1

    @property
    def perplexity(self) -> float:
        return math.exp(-sum(self.logprobs) / len(self.logprobs))


@dataclass
class EmbeddingOutput:
    embedding: list[float]  # [d_model]


@dataclass
class EmbeddingRequestOutput:
    """One text's embedding (vLLM's shape: ``out.outputs.embedding``)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


@dataclass
class EngineStats:
    """A snapshot of ``LLMEngine.get_stats()``: sequences in each state (a request with ``n`` samples counts ``n``
    once its prompt is computed), KV-cache use, and totals since the engine started."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of the pool's blocks held by sequences, 0 to 1
    prefix_cache_queries: int  # prompt tokens (prompt + generated, for a resumed sequence) looked up
    prefix_cache_hits: int  # of those, tokens served from the cache
    num_preemptions: int
    prompt_tokens: int  # prompt tokens of every request added
    generation_tokens: int  # tokens sampled
    # speculative decoding: sequence steps that fed drafts, the drafts fed, and of those the ones accepted
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_num_accepted_tokens_per_pos: tuple[int, ...] = ()  # drafts accepted at each place after the token
    # LoRA (enable_lora): the adapters of the running and of the waiting sequences, by name, and max_loras (0: off)
    running_lora_adapters: tuple[str, ...] = ()
    waiting_lora_adapters: tuple[str, ...] = ()
    max_lora: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def spec_decode_acceptance_rate(self) -> float:
        """Of the drafts fed, the fraction accepted (0 without speculation)."""
        n = self.spec_decode_num_draft_tokens
        return self.spec_decode_num_accepted_tokens / n if n else 0.0
