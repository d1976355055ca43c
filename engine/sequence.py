"""A ``Request`` (one prompt and its sampling parameters) and its ``Sequence`` s (one per completion, ``n`` of them).

A sequence's tokens are its prompt then what it generated; ``num_computed`` of them have their K/V in the paged
cache, in the blocks of ``block_table`` (token ``t`` in block ``block_table[t // block_size]``). The tokens still
to compute are ``num_tokens - num_computed``: the whole prompt at first (minus what the prefix cache served), then
one per step (the token sampled last, fed with its ``draft_token_ids`` when speculating), or everything again after
a preemption.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from engine.lora import LoRARequest
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # in the scheduler's queue: not started yet, or preempted (its blocks given back)
    RUNNING = "running"  # holds blocks; computes a prompt chunk or one decode token per step
    FORK_PENDING = "fork_pending"  # sample 1..n-1 of a request, until its prompt is computed once and forked
    FINISHED = "finished"


# Python 3.11 finds an enum member through its class in about 0.15 us, a cost per sequence in a step's loops: the
# properties below that run for every sequence at every step compare with this module constant instead
_FINISHED = SequenceStatus.FINISHED


@dataclass(eq=False)
class Sequence:
    """One completion of a request: its tokens, its place in the paged KV cache, and its output so far."""

    seq_id: int
    request: Request
    sample_index: int  # which of the request's n completions
    generator: torch.Generator | None = None  # seeded requests draw from their own stream
    output_token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0  # sum of the sampled tokens' log-probs
    top_logprobs: list[dict[int, float]] = field(default_factory=list)  # when params.logprobs is set
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks computed so far
    num_computed: int = 0  # tokens whose K/V are in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" or "length"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    text: str = ""  # detokenized output so far (a stop string cut off)
    detokenizer: object | None = None  # IncrementalDecoder when the request wants text
    num_detokenized: int = 0  # output tokens already in ``text`` (a final-only output detokenizes at the end)
    num_sent_tokens: int = 0  # output tokens already returned in a DELTA output
    num_sent_chars: int = 0  # characters of ``text`` already returned in a DELTA output
    # speculative decoding: tokens guessed to follow the last one, fed with it in the next step (see speculative.py)
    draft_token_ids: list[int] = field(default_factory=list)
    draft_computed: int = 0  # tokens whose K/V the draft model's cache holds (engine.draft_model), in these blocks
    grammar: object | None = None  # structured outputs: the sequence's Grammar (engine.structured_outputs)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def last_token(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.request.prompt_token_ids[-1]

    @property
    def max_total_tokens(self) -> int:
        """Tokens this sequence may hold in the cache at most (the last sampled token is never fed back)."""
        return len(self.request.prompt_token_ids) + self.params.max_tokens - 1

    def all_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids + self.output_token_ids

    def token_range(self, start: int, stop: int) -> list[int]:
        """Positions ``[start, stop)`` of the prompt, then the output, then the drafts: a step's chunk, copied
        without building the whole list (a long sequence's last few tokens cost a few, not its length)."""
        prompt, output = self.request.prompt_token_ids, self.output_token_ids
        p = len(prompt)
        o = p + len(output)
        tokens = prompt[start:stop] if start < p else []
        if stop > p and start < o:
            tokens += output[max(start - p, 0) : stop - p]
        if stop > o:
            tokens += self.draft_token_ids[max(start - o, 0) : stop - o]
        return tokens

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    @property
    def is_finished(self) -> bool:
        return self.status is _FINISHED


@dataclass(frozen=True, slots=True)
class RequestMetrics:
    """Wall-clock times (``time.time()``) of a request's life. Frozen: the engine replaces a request's metrics when a
    time is set (three times in its life), so every output can hold the request's current one without a copy."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(eq=False)
class Request:
    """One prompt with its sampling parameters and its ``n`` sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenize: bool  # whether outputs carry text (a tokenizer is available)
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.time()))
    seqs: list[Sequence] = field(default_factory=list)
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache served, set when first scheduled
    # with params.prompt_logprobs: entry t for prompt token t (its logprob and top alternatives), None for token 0;
    # filled chunk by chunk as the prompt is computed
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=lambda: [None])
    num_outputs: int = 0  # outputs returned so far
    # a finished sequence keeps its blocks until LLMEngine.release (beam search forks the next beams from them)
    keep_blocks: bool = False
    priority: int = 0  # with the priority scheduling policy: lower goes first
    bad_word_ids: list[list[int]] = field(default_factory=list)  # params.bad_words as token sequences
    lora_request: LoRARequest | None = None  # the LoRA adapter it runs with (None: the base model)
    # the prefix cache's hash chain starts here: K/V computed under an adapter are that adapter's alone
    cache_root: int | None = None

    @property
    def finished(self) -> bool:
        for seq in self.seqs:  # a loop, not all(genexpr): asked for every request at every step
            if seq.status is not _FINISHED:
                return False
        return True

    @property
    def num_pending_forks(self) -> int:
        """Samples that start once the prompt is computed (n - 1 until then, 0 after)."""
        return sum(seq.status is SequenceStatus.FORK_PENDING for seq in self.seqs)
