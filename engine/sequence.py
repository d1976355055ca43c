"""A ``Sequence``: one completion being generated, its tokens and its place in the paged KV cache."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from engine.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # admitted, not yet prefilled
    RUNNING = "running"  # prefilled, decoding
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """One completion: the prompt, the tokens generated so far, and the KV blocks that hold them."""

    seq_id: int
    request_index: int  # which prompt of the generate() call it belongs to
    sample_index: int  # which of that prompt's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    text: str = ""  # detokenized output so far (stop strings cut off)
    stop_reason: str | int | None = None
    detokenizer: object | None = None  # IncrementalDecoder when text is wanted
    emitted: int = 0  # characters of ``text`` already streamed

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def max_total_tokens(self) -> int:
        """Tokens this sequence may hold in the cache at most (the last sampled token is never fed back)."""
        return len(self.prompt_token_ids) + self.params.max_tokens - 1

    @property
    def cumulative_logprob(self) -> float:
        return float(sum(self.output_logprobs))

    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
