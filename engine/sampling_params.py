"""What a request asks of the sampler: ``SamplingParams`` (vLLM's names and meanings, each field validated) and
``RequestOutputKind`` (which outputs the engine returns for it)."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from engine.structured_outputs import StructuredOutputsParams

MIN_TEMPERATURE = 1e-2  # a smaller non-zero temperature is raised to this (vLLM's floor; 0 stays greedy)
MAX_LOGPROBS = 20  # most alternatives a request may ask for per token (vLLM's default limit)
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2] (OpenAI's range)
MAX_LOGIT_BIAS = 100.0  # logit_bias values lie in [-100, 100] (OpenAI's range)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _normalize_logit_bias(bias) -> dict[int, float] | None:
    """``{token id: bias}`` with int keys; JSON's decimal-string keys ("50256") become ints. ``ValueError`` naming
    ``logit_bias`` for anything else. Whether the ids are inside the vocabulary is the engine's check."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias or None, got {type(bias).__name__}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        if isinstance(key, str) and re.fullmatch(r"[0-9]+", key):
            token = int(key)
        elif _is_int(key) and key >= 0:
            token = key
        else:
            raise ValueError(f"logit_bias keys must be token ids (non-negative ints or decimal strings), got {key!r}")
        if not _is_number(value) or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {value!r} for token {key!r}")
        if token in out:
            raise ValueError(f"logit_bias names token {token} twice")
        out[token] = float(value)
    return out


class RequestOutputKind(enum.Enum):
    """Which outputs ``LLMEngine.step`` returns for a request (vLLM's names): everything so far at each step, only
    what is new since the previous output, or one output when the request finishes."""

    CUMULATIVE = "cumulative"  # the engine's default: each step's output holds all text and tokens so far
    DELTA = "delta"  # each output holds the text, tokens and logprobs new since the previous one (streaming)
    FINAL_ONLY = "final_only"  # one output, when finished (what ``LLM.generate`` asks for)


@dataclass
class SamplingParams:
    """How to sample one request's completions. Invalid values raise ``ValueError`` naming the field."""

    n: int = 1  # completions per prompt
    max_tokens: int = 16  # new tokens per completion
    temperature: float = 1.0  # 0 means greedy; a non-zero one below 0.01 is raised to 0.01
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0  # nucleus mass; 1.0: off
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one; 0.0: off
    repetition_penalty: float = 1.0  # CTRL-style, over prompt and generated tokens; 1.0: off
    stop: str | list[str] | None = None  # stop strings (not included in the output text)
    stop_token_ids: list[int] | None = None  # stop tokens (not included in the output)
    include_stop_str_in_output: bool = False  # keep the stop string (or a stop token's text) at the end of the text
    ignore_eos: bool = False  # keep going past <|endoftext|>
    seed: int | None = None  # per-request generator: reproducible, batch-independent samples
    logprobs: int | None = None  # return the sampled token's logprob plus this many top alternatives
    prompt_logprobs: int | None = None  # each prompt token's logprob plus this many top alternatives
    # with prompt_logprobs: the first prompt position scored (earlier entries are None); the prefix cache may serve
    # the tokens before position prompt_logprobs_start - 1, whose logits nobody needs (lm-eval's continuations)
    prompt_logprobs_start: int = 1
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens; -1: the model's context
    presence_penalty: float = 0.0  # subtracted from each token already generated; in [-2, 2]
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated; in [-2, 2]
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    allowed_token_ids: list[int] | None = None  # sample only these tokens (the others' logits -inf)
    bad_words: list[str] | None = None  # words never generated (their last token banned where it would end one)
    min_tokens: int = 0  # tokens to generate before EOS, a stop token or a stop string may end the sequence
    no_repeat_ngram_size: int = 0  # transformers': no n-gram of this size twice in prompt + output; 0: off
    # a JSON schema, any JSON object, a regex or a choice the completion must match (engine.structured_outputs)
    structured_outputs: StructuredOutputsParams | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # what each step's output holds (see the enum)
    detokenize: bool = True  # False: token ids only, no text (a benchmark's choice; stop strings need the text)
    skip_special_tokens: bool = True  # <|endoftext|> in an output (ignore_eos, a kept stop token) adds no text

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool):
            raise ValueError(f"temperature must be a number, got {self.temperature!r}")
        if not 0.0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature!r}")
        if 0.0 < self.temperature < MIN_TEMPERATURE:  # logits / 1e-246 overflow to inf, softmax to NaN (vLLM's rule)
            self.temperature = MIN_TEMPERATURE
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= 1, or 0 / -1 for off; got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be a number in [0, 1], got {self.min_p!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0.0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
                raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
            self.stop = list(self.stop)
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids
            ):
                raise ValueError(
                    f"stop_token_ids must be a list of non-negative token ids, got {self.stop_token_ids!r}"
                )
            self.stop_token_ids = list(self.stop_token_ids)
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, (list, tuple)) or not ids or not all(_is_int(t) and t >= 0 for t in ids):
                raise ValueError(f"allowed_token_ids must be a non-empty list of token ids or None, got {ids!r}")
            self.allowed_token_ids = list(ids)
        if self.bad_words is not None:
            if not isinstance(self.bad_words, (list, tuple)) or not all(
                isinstance(w, str) and w for w in self.bad_words
            ):
                raise ValueError(f"bad_words must be a list of non-empty strings or None, got {self.bad_words!r}")
            self.bad_words = list(self.bad_words)
        for name in ("include_stop_str_in_output", "ignore_eos", "detokenize", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need the text: detokenize=False cannot take stop (use stop_token_ids)")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {value!r}")
        k = self.truncate_prompt_tokens
        if k is not None and (not _is_int(k) or (k < 1 and k != -1)):
            raise ValueError(f"truncate_prompt_tokens must be an integer >= 1, -1 or None, got {k!r}")
        if not _is_int(self.prompt_logprobs_start) or self.prompt_logprobs_start < 1:
            raise ValueError(f"prompt_logprobs_start must be an integer >= 1, got {self.prompt_logprobs_start!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        self.logit_bias = _normalize_logit_bias(self.logit_bias)
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}"
            )
        if not _is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}")
        self._check_structured_outputs()
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")

    def _check_structured_outputs(self) -> None:
        so = self.structured_outputs
        if so is None:
            return
        if isinstance(so, dict):
            self.structured_outputs = so = StructuredOutputsParams(**so)
        if not isinstance(so, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams or None, got {type(so).__name__}")
        if self.ignore_eos or self.min_tokens:  # EOS ends a structured completion once it is complete
            raise ValueError("structured_outputs cannot be combined with ignore_eos or min_tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    @property
    def penalized(self) -> bool:
        """Whether a repetition, frequency or presence penalty applies (they need the sequence's tokens)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def modifies_logits(self) -> bool:
        """Whether :func:`process_logits` changes this request's logits at all (checked for every row every step:
        one flat expression)."""
        return bool(
            self.min_tokens
            or self.logit_bias
            or self.frequency_penalty
            or self.presence_penalty
            or self.repetition_penalty != 1.0
            or self.no_repeat_ngram_size
            or self.structured_outputs
            or self.allowed_token_ids
            or self.bad_words
        )
