"""What the API returns: vLLM-shaped generation outputs, scores and stream deltas."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One completion of a prompt."""

    index: int  # which of the prompt's n completions
    text: str
    token_ids: list[int]
    cumulative_logprob: float  # sum of the sampled tokens' log-probabilities
    finish_reason: str | None  # "stop" (EOS, stop token or stop string) or "length"
    logprobs: list[dict[int, float]] | None = None  # per token: sampled token + top alternatives
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it, if any


@dataclass
class RequestOutput:
    """All completions of one prompt."""

    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


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
