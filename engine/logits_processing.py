"""The per-request logit changes, applied before sampling (vLLM's order): ``logit_bias``, ``allowed_token_ids``, the
structured outputs' mask, the ``min_tokens`` mask, the repetition, frequency and presence penalties, then
transformers' ``no_repeat_ngram_size``. Each is one indexed tensor op for the whole batch over the (row, token)
pairs it touches, and runs only when some row of the batch asks for it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch

from engine.sampling_params import SamplingParams
from engine.structured_outputs import Grammar, allowed_tokens


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


def keep_only(logits: torch.Tensor, rows: list[int], keep: torch.Tensor) -> None:
    """In place: in row ``rows[j]``, every logit where ``keep[j]`` (bool, on the logits' device) is False becomes
    -inf; in place when ``rows`` are every row (no gather)."""
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(~keep, float("-inf"))
        return
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~keep, float("-inf"))


def mask_disallowed(logits: torch.Tensor, rows: list[int], grammars: list[Grammar]) -> None:
    """In place: -inf for each row's tokens that its structured output's grammar does not allow next."""
    keep_only(logits, rows, allowed_tokens(grammars, logits.shape[-1], logits.device))


def _token_sets(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """``[len(token_lists), vocab]`` bool, True at each list's tokens (``allowed_token_ids``)."""
    keep = torch.zeros(len(token_lists), vocab, dtype=torch.bool)
    for j, ids in enumerate(token_lists):
        keep[j, ids] = True
    return keep.to(device)


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


def repeated_ngram_tokens(tokens: Sequence[int], n: int) -> list[int]:
    """The tokens that would complete an n-gram ``tokens`` already holds, when appended to it (transformers'
    ``no_repeat_ngram_size``: for ``n = 1``, every token it holds)."""
    if n < 1 or len(tokens) + 1 < n:
        return []
    prefix = tuple(tokens[len(tokens) - n + 1 :]) if n > 1 else ()
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == prefix]


def process_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[TokenHistory] | None,
    eos_token_id: int | None,
) -> None:
    """In place, in vLLM's order: add ``logit_bias``; -inf outside ``allowed_token_ids``; -inf for the tokens a
    structured output's grammar does not
    allow next (``histories[i].grammar``); set EOS (unless ``ignore_eos``) and ``stop_token_ids`` to
    -inf in rows with fewer than ``min_tokens`` output tokens; the repetition penalty over prompt and output
    tokens; the frequency and presence penalties over output tokens only (OpenAI's and vLLM's definition); -inf
    for the tokens that would repeat an n-gram of ``no_repeat_ngram_size`` (transformers'), and for those that would
    end one of the ``bad_words`` (``histories[i].request.bad_word_ids``). Rows that use none of
    these are left untouched, and a feature no row uses costs nothing. ``histories[i]`` holds row ``i``'s tokens
    (needed for all but ``logit_bias``)."""
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    if biased:
        apply_logit_bias(logits, biased, [params[i].logit_bias for i in biased])
    restricted = [i for i, p in enumerate(params) if p.allowed_token_ids]
    if restricted:
        allowed = [params[i].allowed_token_ids for i in restricted]
        keep_only(logits, restricted, _token_sets(allowed, logits.shape[-1], logits.device))
    rows = [i for i, p in enumerate(params) if p.min_tokens or p.penalized or p.no_repeat_ngram_size or p.bad_words]
    structured = [i for i, p in enumerate(params) if p.structured_outputs]
    if not rows and not structured:
        return
    if histories is None:
        raise ValueError(
            "min_tokens, the penalties, no_repeat_ngram_size and structured outputs need the sequences (histories)"
        )
    if structured:
        mask_disallowed(logits, structured, [histories[i].grammar for i in structured])
    if not rows:
        return
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
    ngrams = [i for i in rows if params[i].no_repeat_ngram_size]
    if ngrams:
        histories_of = [histories[i].prompt_token_ids + histories[i].output_token_ids for i in ngrams]
        banned = [repeated_ngram_tokens(h, params[i].no_repeat_ngram_size) for i, h in zip(ngrams, histories_of)]
        mask_tokens(logits, ngrams, banned)
    worded = [i for i in rows if params[i].bad_words]
    if worded:
        banned = [bad_word_endings(histories[i].output_token_ids, histories[i].request.bad_word_ids) for i in worded]
        mask_tokens(logits, worded, banned)


def bad_word_endings(output: Sequence[int], words: list[list[int]]) -> list[int]:
    """The tokens that would end one of ``words`` (token sequences) after ``output``: a word's last token, where the
    output ends with the rest of it (vLLM's ``bad_words``, over the generated tokens)."""
    n = len(output)
    return [ids[-1] for ids in words if len(ids) - 1 <= n and list(output[n - len(ids) + 1 :]) == ids[:-1]]


def _min_tokens_stops(p: SamplingParams, eos_token_id: int | None) -> list[int]:
    """The tokens ``min_tokens`` holds back: the stop tokens, and EOS unless ignored (vLLM's set)."""
    eos = [eos_token_id] if eos_token_id is not None and not p.ignore_eos else []
    return (p.stop_token_ids or []) + eos
