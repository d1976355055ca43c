"""Beam search: vLLM's API (``LLM.beam_search(prompts, BeamSearchParams(...))``), transformers' algorithm, so that
``generate(num_beams=k, do_sample=False)`` of transformers and ours return the same beams.

Each step every running beam is one engine request of one token whose top ``2 * beam_width`` logprobs are the
beam's candidates (as in vLLM). The request starts as a fork of the previous step's request for the beam it
extends, sharing its blocks (the partly filled last one copied on write), so a step computes one token per beam:
a decode step. This module holds the search itself, one :class:`BeamSearch` per prompt, fed those candidates;
:meth:`engine.llm.LLM.beam_search` drives it.

transformers' rules, which this follows:

- the ``2 * beam_width`` best continuations of all beams (cumulative logprob) are ranked; the best
  ``beam_width`` of them that do not end in EOS run on;
- a continuation that ends in EOS becomes a hypothesis only if it ranks among the first ``beam_width``; its
  score is its cumulative logprob divided by ``generated_tokens ** length_penalty``; at ``max_tokens``, the best
  ``beam_width`` continuations all become hypotheses; the ``beam_width`` best hypotheses are kept;
- the search of a prompt stops once the hypotheses are full and: ``early_stopping=True``; or (``False``) the best
  running beam, scored at its current length, cannot beat the worst hypothesis; or (``"never"``) not even at
  ``max_tokens`` when ``length_penalty > 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.logits_processing import repeated_ngram_tokens
from engine.sampling_params import RequestOutputKind, SamplingParams


@dataclass(frozen=True)
class BeamSearchParams:
    """How to search (vLLM's names; ``length_penalty`` and ``early_stopping`` as transformers defines them)."""

    beam_width: int
    max_tokens: int = 16
    ignore_eos: bool = False  # EOS is an ordinary token: every hypothesis runs to max_tokens
    length_penalty: float = 1.0  # a hypothesis scores cum_logprob / generated_tokens ** length_penalty
    early_stopping: bool | str = False  # False, True or "never" (see the module's docstring)
    no_repeat_ngram_size: int = 0  # transformers': no beam holds an n-gram of this size twice (prompt included)

    def __post_init__(self) -> None:
        if not _is_int(self.beam_width) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        lp = self.length_penalty
        if not isinstance(lp, (int, float)) or isinstance(lp, bool) or not math.isfinite(lp):
            raise ValueError(f"length_penalty must be a finite number, got {lp!r}")
        if self.early_stopping is not True and self.early_stopping is not False and self.early_stopping != "never":
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not _is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class BeamSearchSequence:
    """One hypothesis: ``tokens`` are the prompt's and the generated ones (vLLM's), ``text`` their decoding
    (without a final EOS), ``score`` transformers' ``sequences_scores`` entry."""

    tokens: list[int]
    logprobs: list[float]  # per generated token
    cum_logprob: float
    score: float  # cum_logprob / len(logprobs) ** length_penalty
    finish_reason: str  # "stop" (EOS) or "length"
    text: str | None = None  # None without a tokenizer


def generated(seq: BeamSearchSequence, num_prompt_tokens: int, tokenizer) -> tuple[list[int], str]:
    """What a hypothesis added to its prompt: its token ids (EOS included) and their text (EOS left out), as a
    completion has them."""
    new = seq.tokens[num_prompt_tokens:]
    return new, tokenizer.decode(new[:-1] if seq.finish_reason == "stop" else new)


@dataclass
class BeamSearchOutput:
    """A prompt's ``beam_width`` hypotheses, best score first."""

    sequences: list[BeamSearchSequence]


@dataclass
class Beam:
    """A running beam: what it generated so far."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    cum_logprob: float = 0.0
    source: int = 0  # the index, among the previous step's running beams, of the one it extends

    def extended(self, token: int, logprob: float, source: int) -> Beam:
        return Beam(self.tokens + [token], self.logprobs + [logprob], self.cum_logprob + logprob, source)


class BeamSearch:
    """One prompt's search. Each step: :attr:`running` beams go to the model; :meth:`advance` takes each one's
    next-token candidates. :attr:`done` once it may stop; :meth:`output` then gives the hypotheses."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_id: int | None) -> None:
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.eos_token_id = None if params.ignore_eos else eos_token_id
        self.running = [Beam()]  # one beam at first: the other beam_width - 1 would repeat it
        self.hypotheses: list[tuple[float, Beam, str]] = []  # (score, beam, finish reason), best first
        self.can_improve = True  # transformers' early-stop heuristic, once false for good
        self.done = False

    def _banned(self, beam: Beam) -> set[int]:
        """The tokens ``no_repeat_ngram_size`` forbids after ``beam``."""
        n = self.params.no_repeat_ngram_size
        return set(repeated_ngram_tokens(self.prompt_token_ids + beam.tokens, n)) if n else set()

    def step_params(self, beam: Beam) -> SamplingParams:
        """The one-token request that gives ``beam``'s candidates: its ``2 * beam_width`` most likely next tokens
        with their logprobs (as the model gives them: transformers bans n-grams after the log-softmax), plus as
        many as ``no_repeat_ngram_size`` forbids."""
        params = SamplingParams(max_tokens=1, temperature=0.0, output_kind=RequestOutputKind.FINAL_ONLY)
        params.logprobs = 2 * self.params.beam_width + len(self._banned(beam))  # past MAX_LOGPROBS, a user's limit
        return params

    def advance(self, candidates: list[dict[int, float]]) -> None:
        """``candidates[b]``: running beam ``b``'s most likely next tokens -> logprob, as :meth:`step_params` asks."""
        width, length = self.params.beam_width, len(self.running[0].tokens) + 1
        banned = [self._banned(beam) for beam in self.running]
        ranked = sorted(
            ((beam.cum_logprob + logprob, b, token, logprob)
             for b, (beam, tops) in enumerate(zip(self.running, candidates, strict=True))
             for token, logprob in tops.items() if token not in banned[b]),
            key=lambda c: (-c[0], c[1], c[2]),  # transformers' top-k over (beam, token): ties in that order
        )[: 2 * width]  # fmt: skip
        ends = [token == self.eos_token_id or length == self.params.max_tokens for _, _, token, _ in ranked]
        full = len(self.hypotheses) == width
        if self.can_improve and not (full and self.params.early_stopping is True):
            for rank in range(min(width, len(ranked))):
                if ends[rank]:
                    self._add_hypothesis(self._extend(ranked[rank]), length)
        self.running = [self._extend(c) for c, end in zip(ranked, ends) if not end][:width]
        self._update_done(length)

    def _extend(self, candidate: tuple[float, int, int, float]) -> Beam:
        _, b, token, logprob = candidate
        return self.running[b].extended(token, logprob, b)

    def _add_hypothesis(self, beam: Beam, length: int) -> None:
        score = beam.cum_logprob / length**self.params.length_penalty
        reason = "stop" if beam.tokens[-1] == self.eos_token_id else "length"
        self.hypotheses.append((score, beam, reason))
        self.hypotheses.sort(key=lambda h: -h[0])
        del self.hypotheses[self.params.beam_width :]

    def _update_done(self, length: int) -> None:
        p, full = self.params, len(self.hypotheses) == self.params.beam_width
        if full and self.can_improve and self.running:
            best_length = p.max_tokens if p.early_stopping == "never" and p.length_penalty > 0 else length
            best_possible = self.running[0].cum_logprob / best_length**p.length_penalty
            self.can_improve = best_possible > self.hypotheses[-1][0]
        self.done = not self.running or not self.can_improve or (full and p.early_stopping is True)

    def output(self, tokenizer=None) -> BeamSearchOutput:
        sequences = []
        for score, beam, reason in self.hypotheses:
            text_ids = beam.tokens[:-1] if reason == "stop" else beam.tokens
            text = tokenizer.decode(self.prompt_token_ids + text_ids) if tokenizer is not None else None
            tokens = self.prompt_token_ids + beam.tokens
            sequences.append(BeamSearchSequence(tokens, beam.logprobs, beam.cum_logprob, score, reason, text))
        return BeamSearchOutput(sequences)
