"""Sampling parameters (vLLM's names and meanings) and the batched sampler.

The sampler draws with the exponential-race trick (``argmax(probs / Exponential(1))``, as gpt-fast and
nano-vllm do; see :mod:`engine.race`): it needs no host sync, and because each seeded request draws its noise from
its own ``torch.Generator``, its samples do not depend on what else is in the batch or where it sits.

Before that, :func:`process_logits` applies the per-request logit changes (``logit_bias``, the ``min_tokens``
mask, the repetition, frequency and presence penalties): each is one indexed tensor op for the whole batch over the
(row, token) pairs it touches, and runs only when some row of the batch asks for it.
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

try:  # optional, not a dependency: numpy's CPU sort is the fast one for _largest
    import numpy as np
except ImportError:
    np = None

from engine.host_tensors import list_tensor
from engine.race import race, row_argmax

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
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0  # nucleus mass; 1.0: off
    repetition_penalty: float = 1.0  # CTRL-style, over prompt and generated tokens; 1.0: off
    stop: str | list[str] | None = None  # stop strings (not included in the output text)
    stop_token_ids: list[int] | None = None  # stop tokens (not included in the output)
    ignore_eos: bool = False  # keep going past <|endoftext|>
    seed: int | None = None  # per-request generator: reproducible, batch-independent samples
    logprobs: int | None = None  # return the sampled token's logprob plus this many top alternatives
    prompt_logprobs: int | None = None  # each prompt token's logprob plus this many top alternatives
    # with prompt_logprobs: the first prompt position scored (earlier entries are None); the prefix cache may serve
    # the tokens before position prompt_logprobs_start - 1, whose logits nobody needs (lm-eval's continuations)
    prompt_logprobs_start: int = 1
    presence_penalty: float = 0.0  # subtracted from each token already generated; in [-2, 2]
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated; in [-2, 2]
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    min_tokens: int = 0  # tokens to generate before EOS, a stop token or a stop string may end the sequence
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # what each step's output holds (see the enum)

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool):
            raise ValueError(f"temperature must be a number, got {self.temperature!r}")
        if not 0.0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= 1, or 0 / -1 for off; got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
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
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {value!r}")
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
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")

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
        )


def seeded_generator(seed: int, sample_index: int, device: torch.device) -> torch.Generator:
    """The generator of sample ``sample_index`` of a request seeded with ``seed``: the one a request seeded with
    ``seed + sample_index`` draws from (vLLM's parallel sampling), independent of the batch."""
    g = torch.Generator(device=device)
    g.manual_seed(((seed + sample_index) * 0x9E3779B97F4A7C15) % (1 << 63))
    return g


def token_logprobs(
    logprobs: torch.Tensor, tokens: torch.Tensor, num_top: list[int | None]
) -> tuple[list[float], list[dict[int, float] | None]]:
    """Per row: the sampled token's log-prob, and (where ``num_top[i]`` is not None) a dict of it and the row's
    ``num_top[i]`` most likely tokens. One top-k for the whole batch, one transfer to the host."""
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    if num_top.count(None) == len(num_top):  # no row asks for alternatives (most steps): no loop over the rows
        return chosen, [None] * len(num_top)
    width = max((k for k in num_top if k), default=0)
    top = logprobs.topk(width, dim=-1) if width else None
    top_ids, top_values = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
    entries: list[dict[int, float] | None] = []
    for i, (token, k) in enumerate(zip(tokens.tolist(), num_top)):
        if k is None:
            entries.append(None)
            continue
        entry = {token: chosen[i]}
        entry.update(zip(top_ids[i][:k], top_values[i][:k]) if k else ())
        entries.append(entry)
    return chosen, entries


class TokenHistory(Protocol):
    """A sequence's tokens so far, as the penalties and ``min_tokens`` need them (``Sequence`` is one)."""

    @property
    def prompt_token_ids(self) -> list[int]: ...

    @property
    def output_token_ids(self) -> list[int]: ...


def _occurrences(
    rows: list[int], token_lists: list[Iterable[int]], per_row: list[list[float]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every token occurrence in ``token_lists[j]`` as the index pair (``rows[j]``, token), with each per-row value
    ``per_row[k][j]`` repeated for row ``j``'s occurrences: ``(row_index [N], token_index [N], values [K, N])`` on
    ``device``, built on the host and copied in two transfers."""
    token_lists = [list(ids) for ids in token_lists]
    which = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(ids) for ids in token_lists]))
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    index = torch.stack([torch.tensor(rows, dtype=torch.long)[which], tokens]).to(device)
    values = torch.tensor(per_row, dtype=torch.float32)[:, which].to(device)
    return index[0], index[1], values


def apply_logit_bias(logits: torch.Tensor, rows: list[int], biases: list[dict[int, float]]) -> None:
    """In place: add ``biases[j][t]`` to ``logits[rows[j], t]``, all rows in one indexed add."""
    row_ids = [i for i, bias in zip(rows, biases) for _ in bias]
    tokens = [t for bias in biases for t in bias]
    values = torch.tensor([v for bias in biases for v in bias.values()], dtype=logits.dtype)
    index = torch.tensor([row_ids, tokens], device=logits.device)
    logits.index_put_((index[0], index[1]), values.to(logits.device), accumulate=True)


def mask_tokens(logits: torch.Tensor, rows: list[int], tokens: list[list[int]]) -> None:
    """In place: ``logits[rows[j], t] = -inf`` for every ``t`` in ``tokens[j]`` (ids past the vocabulary, which can
    never be sampled, are skipped)."""
    V = logits.shape[-1]
    pairs = [(i, t) for i, ids in zip(rows, tokens) for t in ids if t < V]
    if pairs:
        index = torch.tensor(pairs, device=logits.device).T
        logits.index_put_((index[0], index[1]), torch.tensor(float("-inf"), device=logits.device))


def apply_repetition_penalty(
    logits: torch.Tensor, rows: list[int], token_lists: list[Iterable[int]], penalties: list[float]
) -> None:
    """CTRL's penalty in place: in row ``rows[j]``, each token of ``token_lists[j]`` has a positive logit divided by
    ``penalties[j]``, a negative one multiplied by it. A token listed twice is gathered before any write and
    written the same value twice, so it is penalized once."""
    r, t, (p,) = _occurrences(rows, token_lists, [penalties], logits.device)
    v = logits[r, t]
    logits[r, t] = torch.where(v > 0, v / p, v * p).to(logits.dtype)


def apply_frequency_presence(
    logits: torch.Tensor,
    rows: list[int],
    token_lists: list[Iterable[int]],
    frequency: list[float],
    presence: list[float],
) -> None:
    """In place, OpenAI's penalties: row ``rows[j]`` loses ``frequency[j] * count + presence[j] * (count > 0)`` on
    each token, ``count`` being its occurrences in ``token_lists[j]``. Sparse (work per occurrence, not per
    vocabulary entry) and without a host sync: the frequency term is an accumulating indexed add of ``-f`` per
    occurrence, the presence term a gather then a write that duplicates repeat identically."""
    r, t, (f, p) = _occurrences(rows, token_lists, [frequency, presence], logits.device)
    logits.index_put_((r, t), -f.to(logits.dtype), accumulate=True)
    logits[r, t] = logits[r, t] - p.to(logits.dtype)


def process_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[TokenHistory] | None,
    eos_token_id: int | None,
) -> None:
    """In place, in vLLM's order: add ``logit_bias``; set EOS (unless ``ignore_eos``) and ``stop_token_ids`` to
    -inf in rows with fewer than ``min_tokens`` output tokens; the repetition penalty over prompt and output
    tokens; the frequency and presence penalties over output tokens only (OpenAI's and vLLM's definition).
    Rows that use none of these are left untouched, and a feature no row uses costs nothing.
    ``histories[i]`` holds row ``i``'s tokens (needed for the penalties and ``min_tokens``)."""
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    if biased:
        apply_logit_bias(logits, biased, [params[i].logit_bias for i in biased])
    rows = [i for i, p in enumerate(params) if p.min_tokens or p.penalized]
    if not rows:
        return
    if histories is None:
        raise ValueError("min_tokens and the penalties need the sequences' tokens (histories)")
    short = [i for i in rows if len(histories[i].output_token_ids) < params[i].min_tokens]
    if short:
        mask_tokens(logits, short, [_min_tokens_stops(params[i], eos_token_id) for i in short])
    repeated = [i for i in rows if params[i].repetition_penalty != 1.0]
    if repeated:
        seen = [itertools.chain(histories[i].prompt_token_ids, histories[i].output_token_ids) for i in repeated]
        apply_repetition_penalty(logits, repeated, seen, [float(params[i].repetition_penalty) for i in repeated])
    counted = [i for i in rows if params[i].frequency_penalty or params[i].presence_penalty]
    if counted:
        apply_frequency_presence(logits, counted, [histories[i].output_token_ids for i in counted],
                                 [float(params[i].frequency_penalty) for i in counted],
                                 [float(params[i].presence_penalty) for i in counted])  # fmt: skip


def _min_tokens_stops(p: SamplingParams, eos_token_id: int | None) -> list[int]:
    """The tokens ``min_tokens`` holds back: the stop tokens, and EOS unless ignored (vLLM's set)."""
    eos = [eos_token_id] if eos_token_id is not None and not p.ignore_eos else []
    return (p.stop_token_ids or []) + eos


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus (top-p) sets with -inf; ``top_k`` 0 means off.

    ``logits`` [B, V] fp32 (already divided by temperature); ``top_k`` [B] int64; ``top_p`` [B] fp32.
    """
    V = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)
    return logits.where(kept_tokens(logits, k, top_p, int(k.max())), float("-inf"))


def kept_tokens(logits: torch.Tensor, k: torch.Tensor | None, top_p: torch.Tensor, width: int) -> torch.Tensor:
    """The mask ``[B, V]`` of the tokens :func:`filter_logits` keeps, with the top-k bounds known: ``k`` [B] in
    [1, V] (None: no row uses top-k) and ``width = max(k)`` (V without top-k), so that the caller's host lists spare
    a device sync.

    Each row's ``width`` largest logits are sorted; the kept ones are the first ``k`` of them, then the smallest
    prefix whose mass reaches ``top_p`` (the token that crosses it included). The sort gives values only: the kept
    tokens are those above the last kept value, the cut, and of the tokens equal to it, the lowest ids, as many as
    the sorted prefix holds (a stable sort's choice), so that exactly that many are kept even among ties.
    """
    V = logits.shape[-1]
    top = _largest(logits, width)  # [B, width], descending
    masked = top
    if k is not None:
        rank = torch.arange(width, device=logits.device)
        masked = top.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
    probs = masked.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # non-decreasing, 0 for the first token (always kept)
    # [B, 1]: the tokens with mass before them < top_p; top_p 1 keeps every one (fp32 sums pass 1 before the end of
    # a 50257-wide row)
    num_kept = torch.searchsorted(mass_before, torch.where(top_p < 1.0, top_p, 2.0)[:, None])
    if k is not None:
        num_kept = torch.minimum(num_kept, k[:, None])
    cut = top.gather(1, num_kept - 1)  # [B, 1]: the smallest kept value
    ascending = top.neg()
    above = torch.searchsorted(ascending, cut.neg())  # tokens above the cut (all among the width largest)
    quota = num_kept - above  # how many of the tokens equal to the cut the sorted prefix holds
    at_least = logits >= cut
    if logits.device.type == "cpu" and width == V:  # a host check costs nothing here: are all tied tokens kept?
        tied = torch.searchsorted(ascending, cut.neg(), side="right") - above
        if bool((tied == quota).all()):
            return at_least
    tied = logits == cut
    return at_least & ~(tied & (tied.cumsum(dim=-1) > quota))


def _largest(x: torch.Tensor, width: int) -> torch.Tensor:
    """Each row's ``width`` largest values, largest first. On the CPU numpy's vectorized sort (x86-simd-sort) is
    10 to 20 times faster than ``torch.sort``, and faster than ``torch.topk`` unless ``width`` is a small fraction
    of the row; the values are the same (without numpy, torch's sort)."""
    V = x.shape[-1]
    if np is not None and x.device.type == "cpu" and width * 32 >= V:
        return torch.from_numpy(np.sort(x.neg().numpy(), axis=-1)[:, :width]).neg_()
    if width < V:
        return x.topk(width, dim=-1).values
    return x.sort(dim=-1, descending=True).values


@dataclass
class SamplingBatch:
    """What the sampler reads of one batch's ``SamplingParams`` and generators, as host lists and device tensors.

    Reading them costs about 0.5 us a row (0.13 ms at 256 rows), so the engine keeps a batch's while the same
    sequences decode step after step, as vLLM's persistent batch does: a request's sampling parameters are read
    when its sequence joins a batch, and changing them while it runs has no defined effect."""

    params: list[SamplingParams]
    modifies_logits: bool  # some row has a logit bias, min_tokens or a penalty: process_logits runs
    temperatures: torch.Tensor | None  # [B] fp32, 1 for greedy rows; None when every row is greedy
    greedy_rows: torch.Tensor | None  # [B] bool, when greedy rows and sampled rows mix
    truncated_rows: torch.Tensor | None  # the rows with top-k or top-p, when they are not every row
    top_k: torch.Tensor | None  # per truncated row, in [1, V]; None when no row keeps fewer than V
    width: int  # max(top_k), or V
    top_p: torch.Tensor | None  # per truncated row; None when no row truncates
    seeded: list[tuple[int, torch.Generator]]  # rows drawing from their own generator
    num_top: list[int | None]  # each row's ``logprobs`` (alternatives asked for)

    @classmethod
    def of(
        cls, params: list[SamplingParams], generators: list[torch.Generator | None], vocab: int, device: torch.device
    ) -> SamplingBatch:
        greedy = [p.temperature == 0.0 for p in params]  # p.greedy, without a property call per row
        modifies, num_top = any(p.modifies_logits for p in params), [p.logprobs for p in params]
        if all(greedy):
            return cls(params, modifies, None, None, None, None, vocab, None, [], num_top)
        temperatures = list_tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32, device)
        greedy_rows = list_tensor(greedy, torch.bool, device) if any(greedy) else None
        # only these rows: one row without top-k would make the sort take every row's whole width
        truncated = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0]
        truncated_rows = list_tensor(truncated, torch.int64, device) if 0 < len(truncated) < len(params) else None
        top_k, width, top_p = _truncation([params[i] for i in truncated], vocab, device)
        seeded = [(i, g) for i, g in enumerate(generators) if g is not None]
        return cls(params, modifies, temperatures, greedy_rows, truncated_rows, top_k, width, top_p, seeded, num_top)


def _truncation(params: list[SamplingParams], vocab: int, device: torch.device):
    """``(top_k, width, top_p)`` of the rows that truncate, as :func:`truncate` takes them (``top_k`` None when no
    row keeps fewer than ``vocab``; all None and ``vocab`` when no row truncates)."""
    if not params:
        return None, vocab, None
    top_k, width = None, vocab
    if any(p.top_k > 0 for p in params):
        ks = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
        width = max(ks)
        top_k = list_tensor(ks, torch.int64, device) if min(ks) < vocab else None
    return top_k, width, list_tensor([p.top_p for p in params], torch.float32, device)


class Sampler:
    """Turns one step's logits of a batch into next tokens (and their logprobs).

    ``eos_token_id`` is the token ``min_tokens`` holds back along with each request's ``stop_token_ids``.
    """

    def __init__(self, eos_token_id: int | None = None) -> None:
        self.eos_token_id = eos_token_id

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        histories: Sequence[TokenHistory] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits`` [B, V] fp32 (modified in place); ``generators[i]``: row ``i``'s own generator (seeded
        requests) or None; ``histories[i]`` holds row ``i``'s prompt and output tokens so far (needed when a row
        uses ``min_tokens`` or a penalty). Returns ``(tokens [B], logprobs [B, V])``; see :meth:`sample`."""
        batch = SamplingBatch.of(params, generators, logits.shape[-1], logits.device)
        return self.sample(logits, batch, histories)

    def sample(
        self, logits: torch.Tensor, batch: SamplingBatch, histories: Sequence[TokenHistory] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`__call__` with the batch's parameters already read (kept across steps by the engine).

        Order, as vLLM's: :func:`process_logits` (``logit_bias``, the ``min_tokens`` mask, repetition, frequency
        and presence penalties) gives the processed logits; ``logprobs`` are their log-softmax and greedy rows
        take their argmax. Temperature, top-k and top-p then shape the sampled rows only, so ``logprobs`` are
        after bias and penalties and before temperature and truncation (vLLM's "processed_logprobs").
        """
        if batch.modifies_logits:
            process_logits(logits, batch.params, histories, self.eos_token_id)
        logprobs = torch.log_softmax(logits, dim=-1)
        if batch.temperatures is None:  # every row is greedy
            return row_argmax(logits), logprobs
        scaled = logits / batch.temperatures[:, None]
        sampled = race(scaled, _kept(scaled, batch), batch.seeded)
        if batch.greedy_rows is None:
            return sampled, logprobs
        return torch.where(batch.greedy_rows, row_argmax(logits), sampled), logprobs


def _kept(scaled: torch.Tensor, batch: SamplingBatch) -> torch.Tensor | None:
    """The tokens each row may sample ``[B, V]`` (its top-k / top-p set; every token in a row that doesn't
    truncate), or None when no row truncates."""
    if batch.top_p is None:
        return None
    rows = batch.truncated_rows
    if rows is None:  # every row truncates
        return kept_tokens(scaled, batch.top_k, batch.top_p, batch.width)
    kept = torch.ones_like(scaled, dtype=torch.bool)
    kept[rows] = kept_tokens(scaled[rows], batch.top_k, batch.top_p, batch.width)
    return kept
