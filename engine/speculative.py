"""Speculative decoding's configuration, the rule that verifies drafts, and drafting by n-gram lookup (vLLM's
``speculative_config={"method": "ngram", ...}``, transformers' prompt lookup decoding): no draft model, the drafts
come from the sequence's own tokens. A smaller GPT-2 drafts instead with ``{"model": "gpt2", ...}``
(:mod:`engine.draft_model`); the verification below is the same for both, except that a draft model's drafts for
sampled requests are verified by rejection sampling, which lands more of them.

After each step, a decoding sequence whose last ``n`` tokens (``prompt_lookup_max`` down to ``prompt_lookup_min``)
occurred earlier in its prompt or output proposes the up to ``num_speculative_tokens`` tokens that followed the
first such occurrence. The next step feeds its last token and the drafts together, each a decode row whose context
ends at it (the runner's ``decode_drafts``), and samples every row as the sequence's next token would be sampled.
The output takes the rows' tokens up to and including the first that differs from the draft it checks (or all of
them plus the last row's): each token is drawn from the model's distribution after the tokens before it, so the
output is distributed as without speculation, and greedy decoding chooses the same tokens. A step then gives a
sequence from 1 to ``num_speculative_tokens + 1`` tokens for one pass over the weights, which is what decoding at
small batches pays for.

A sequence speculates only where each row's sampling does not depend on the tokens before it in the chunk: not with
penalties, ``no_repeat_ngram_size``, ``bad_words`` or structured outputs, not before ``min_tokens``, and not when
sampled from its own seeded generator (whose draws would then depend on how many drafts the scheduler could fit,
which depends on the batch).
"""

from __future__ import annotations

import os
import weakref
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, fields

from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

METHODS = ("ngram", "draft_model")
NGRAM_KEYS = ("prompt_lookup_max", "prompt_lookup_min")


@dataclass(frozen=True)
class SpeculativeConfig:
    """How to speculate; built by :meth:`parse` from vLLM's dict (``ValueError`` naming a bad key or value)."""

    num_speculative_tokens: int  # drafts proposed per sequence and step, at most
    method: str = "ngram"  # "draft_model" when ``model`` is given (vLLM infers it the same way)
    prompt_lookup_max: int = 4  # ngram: longest suffix looked up
    prompt_lookup_min: int = 1  # ngram: shortest suffix looked up
    model: str | None = None  # draft_model: a GPT-2 checkpoint (name or directory) sharing the target's vocabulary
    disable_by_batch_size: int | None = None  # no drafts while at least this many sequences run (vLLM's key)

    @classmethod
    def parse(cls, config: SpeculativeConfig | Mapping | None) -> SpeculativeConfig | None:
        if config is None or isinstance(config, SpeculativeConfig):
            return config
        if not isinstance(config, Mapping):
            raise ValueError(f"speculative_config must be a dict or None, got {type(config).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        if "num_speculative_tokens" not in config:
            raise ValueError("speculative_config needs num_speculative_tokens")
        config = dict(config)
        if config.get("model") is not None:
            config.setdefault("method", "draft_model")
            lookup = [key for key in NGRAM_KEYS if key in config]
            if lookup and config["method"] == "draft_model":
                raise ValueError(f"speculative_config: {lookup[0]} is for method 'ngram', not a draft model")
        return cls(**config)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config: method must be one of {METHODS}, got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative_config: {name} must be a positive integer, got {value!r}")
        if self.method == "draft_model" and not (isinstance(self.model, (str, os.PathLike)) and str(self.model)):
            raise ValueError(f"speculative_config: method 'draft_model' needs model (a name or directory), got "
                             f"{self.model!r}")  # fmt: skip
        if self.method == "ngram" and self.model is not None:
            raise ValueError("speculative_config: method 'ngram' takes no model")
        size = self.disable_by_batch_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError(f"speculative_config: disable_by_batch_size must be a positive integer, got {size!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"speculative_config: prompt_lookup_min={self.prompt_lookup_min} exceeds "
                f"prompt_lookup_max={self.prompt_lookup_max}"
            )


def speculates(params: SamplingParams, generated: int, seeded: bool) -> bool:
    """Whether a sequence with ``generated`` output tokens may speculate: each row of its chunk samples as if the
    drafts before it were already its tokens (see the module's docstring)."""
    return not (
        params.penalized
        or params.no_repeat_ngram_size
        or params.structured_outputs
        or params.bad_words
        or generated < params.min_tokens
        or (seeded and params.temperature != 0.0)
    )


class NgramProposer:
    """Drafts for decoding sequences by :func:`lookup_drafts`, each sequence's tokens kept as the 4-byte words the
    search reads, appended as tokens come (building them from a 1000-token list takes 5 us a sequence)."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self._words: weakref.WeakKeyDictionary[Sequence, bytearray] = weakref.WeakKeyDictionary()

    def before_step(self, step) -> None:
        """Nothing to do before a step: the drafts were found when proposed."""

    @staticmethod
    def verify(rows, logits, tokens):
        """The sampled tokens as they are: a draft lands where the row's token equals it."""
        return tokens

    def propose(self, seq: Sequence, num_drafts: int) -> list[int]:
        words = self._words.setdefault(seq, bytearray())
        have, prompt = len(words) // 4, seq.prompt_token_ids
        if have < len(prompt):
            words += array("I", prompt[have:]).tobytes()
            have = len(prompt)
        words += array("I", seq.output_token_ids[have - len(prompt) :]).tobytes()
        return lookup_drafts(words, num_drafts, self.config.prompt_lookup_max, self.config.prompt_lookup_min)


def lookup_drafts(words: bytes | bytearray, num_drafts: int, longest: int, shortest: int) -> list[int]:
    """The up to ``num_drafts`` tokens that followed the first earlier occurrence of the last ``n`` tokens, for the
    largest ``n`` from ``longest`` down to ``shortest`` that occurs; ``[]`` if none does. The first occurrence, as
    transformers' prompt lookup takes it: in a loop of period ``p`` the most recent one would be followed by only
    ``p`` tokens.

    ``words``: the tokens as 4-byte words (``array("I", tokens).tobytes()``), so that the search runs in C:
    ``bytes.find`` for the suffix, word-aligned hits only."""
    count = len(words) // 4
    if num_drafts < 1 or count <= shortest:
        return []
    end = len(words) - 4  # a hit must end before the last token, so that at least one token follows it
    for n in range(min(longest, count - 1), shortest - 1, -1):
        pattern = words[len(words) - 4 * n :]
        hit = words.find(pattern, 0, end)
        while hit >= 0 and hit % 4:
            hit = words.find(pattern, hit + 1, end)
        if hit >= 0:
            start = hit + 4 * n
            return array("I", words[start : start + 4 * num_drafts]).tolist()
    return []


def accepted_length(drafts: list[int], sampled: list[int]) -> int:
    """Tokens a chunk adds: ``sampled[j]`` is row ``j``'s token, ``drafts[j]`` the token row ``j + 1`` was fed;
    every row up to the first whose token differs from its draft counts, that row included."""
    for j, draft in enumerate(drafts):
        if sampled[j] != draft:
            return j + 1
    return len(drafts) + 1
