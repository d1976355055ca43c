"""The batched sampler: the next token of each row of a step's logits, with its log-probs.

After :func:`engine.logits_processing.process_logits` (bias, ``min_tokens``, penalties), temperature, top-k, top-p
and min-p shape each sampled row and the exponential-race trick (``argmax(probs / Exponential(1))``, as gpt-fast and
nano-vllm do; see :mod:`engine.race`) draws its token: it needs no host sync, and because each seeded request draws
its noise from its own ``torch.Generator``, its samples do not depend on what else is in the batch or where it sits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

try:  # optional, not a dependency: numpy's CPU sort is the fast one for _largest
    import numpy as np
except ImportError:
    np = None

from engine.host_tensors import list_tensor
from engine.logits_processing import TokenHistory, process_logits
from engine.race import race, row_argmax
from engine.sampling_params import SamplingParams


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
    ``num_top[i]`` most likely tokens (those that are possible). One top-k for the whole batch, one transfer to the
    host."""
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
        # masked tokens (-inf: a structured output's grammar, a banned n-gram) are no alternative: left out, so a
        # row with fewer than k possible tokens has fewer entries
        if k:
            entry.update((t, v) for t, v in zip(top_ids[i][:k], top_values[i][:k]) if v != -math.inf)
        entries.append(entry)
    return chosen, entries


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
    host = logits.device.type == "cpu"
    top = _largest(logits, width + (host and width < V))  # [B, width], descending (+ the next value on the CPU)
    top, below = top[:, :width], top[:, width:]
    masked = top
    if k is not None:
        rank = torch.arange(width, device=logits.device)
        masked = top.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
    probs = masked.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # non-decreasing, 0 for the first token (always kept)
    # [B, 1]: the tokens with mass before them < top_p; top_p 1 keeps every one (fp32 sums pass 1 before the end of
    # a 50257-wide row), and a top_p that is 0 in fp32 (a valid one below 1.4e-45) still keeps the first
    num_kept = torch.searchsorted(mass_before, torch.where(top_p < 1.0, top_p, 2.0)[:, None]).clamp_(min=1)
    if k is not None:
        num_kept = torch.minimum(num_kept, k[:, None])
    cut = top.gather(1, num_kept - 1)  # [B, 1]: the smallest kept value
    ascending = top.neg()
    above = torch.searchsorted(ascending, cut.neg())  # tokens above the cut (all among the width largest)
    quota = num_kept - above  # how many of the tokens equal to the cut the sorted prefix holds
    at_least = logits >= cut
    if host:  # a host check costs nothing here: are all tokens tied with the cut kept?
        tied = torch.searchsorted(ascending, cut.neg(), side="right") - above  # those among the width largest
        if bool((tied == quota).all()) and bool((below < cut).all()):  # and no other equals the cut
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
    log_min_p: torch.Tensor | None  # [B, 1] fp32, log(min_p) (-inf where off); None when no row uses min_p
    seeded: list[tuple[int, torch.Generator]]  # rows drawing from their own generator
    num_top: list[int | None]  # each row's ``logprobs`` (alternatives asked for)

    @classmethod
    def of(
        cls, params: list[SamplingParams], generators: list[torch.Generator | None], vocab: int, device: torch.device
    ) -> SamplingBatch:
        greedy = [p.temperature == 0.0 for p in params]  # p.greedy, without a property call per row
        modifies, num_top = any(p.modifies_logits for p in params), [p.logprobs for p in params]
        if all(greedy):
            return cls(params, modifies, None, None, None, None, vocab, None, None, [], num_top)
        temperatures = list_tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32, device)
        greedy_rows = list_tensor(greedy, torch.bool, device) if any(greedy) else None
        # only these rows: one row without top-k would make the sort take every row's whole width
        truncated = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0]
        truncated_rows = list_tensor(truncated, torch.int64, device) if 0 < len(truncated) < len(params) else None
        top_k, width, top_p = _truncation([params[i] for i in truncated], vocab, device)
        log_min_p = None
        if any(p.min_p for p in params):  # a greedy row's min_p is 0 here: its sample is thrown away anyway
            floors = [math.log(p.min_p) if p.min_p and not g else -math.inf for p, g in zip(params, greedy)]
            log_min_p = list_tensor(floors, torch.float32, device)[:, None]
        seeded = [(i, g) for i, g in enumerate(generators) if g is not None]
        return cls(params, modifies, temperatures, greedy_rows, truncated_rows, top_k, width, top_p, log_min_p, seeded,
                   num_top)  # fmt: skip


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
        sampled = race(scaled, _with_min_p(scaled, _kept(scaled, batch), batch.log_min_p), batch.seeded)
        if batch.greedy_rows is None:
            return sampled, logprobs
        return torch.where(batch.greedy_rows, row_argmax(logits), sampled), logprobs


def sampling_probs(logits: torch.Tensor, batch: SamplingBatch, draw: bool = False):
    """The distribution :meth:`Sampler.sample` draws each row's token from, ``[B, V]`` fp32, given the logits as it
    processed them: the softmax of the temperature-scaled logits over the row's top-k / top-p / min-p set, and for a
    greedy row all the mass on its argmax (speculative decoding's rejection sampling reads it). With ``draw``, also
    a token per row drawn from it (by the race, as the sampler draws): ``(probs, tokens)``."""
    if batch.temperatures is None:  # every row greedy
        argmax = row_argmax(logits)
        return (_all_on(argmax, logits), argmax) if draw else _all_on(argmax, logits)
    scaled = logits / batch.temperatures[:, None]
    kept = _with_min_p(scaled, _kept(scaled, batch), batch.log_min_p)
    probs = (scaled if kept is None else scaled.masked_fill(~kept, float("-inf"))).softmax(dim=-1)
    argmax = None
    if batch.greedy_rows is not None:  # greedy rows among sampled ones
        argmax = row_argmax(logits)
        probs = torch.where(batch.greedy_rows[:, None], _all_on(argmax, logits), probs)
    if not draw:
        return probs
    tokens = race(scaled, kept, [])
    return probs, tokens if argmax is None else torch.where(batch.greedy_rows, argmax, tokens)


def _all_on(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Distributions shaped as ``like`` with all the mass of row ``i`` on ``tokens[i]``."""
    return torch.zeros_like(like).scatter_(1, tokens[:, None], 1.0)


def draw_from(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` ``[B, V]`` (non-negative, normalized or not, every row with some mass), by
    the race over the tokens with mass."""
    return race(probs.log(), probs > 0, [])


def _with_min_p(scaled: torch.Tensor, kept: torch.Tensor | None, log_min_p: torch.Tensor | None):
    """``kept`` without the tokens below each row's min-p floor: ``log(min_p)`` under the row's largest scaled logit
    (transformers' ``MinPLogitsWarper``, after top-k and top-p as there; the most likely token always stays)."""
    if log_min_p is None:
        return kept
    above = scaled >= scaled.max(dim=-1, keepdim=True).values + log_min_p
    return above if kept is None else kept & above


def _kept(scaled: torch.Tensor, batch: SamplingBatch) -> torch.Tensor | None:
    """The tokens each row may sample ``[B, V]`` (its top-k / top-p set; every token in a row that doesn't
    truncate), or None when no row truncates. A greedy row among rows that don't truncate keeps its first token
    only: its sample is thrown away (it takes its argmax), so on the CPU it costs the race one draw, not ``V``."""
    if batch.top_p is None:
        return None
    rows = batch.truncated_rows
    if rows is None:  # every row truncates
        return kept_tokens(scaled, batch.top_k, batch.top_p, batch.width)
    kept = torch.ones_like(scaled, dtype=torch.bool)
    kept[rows] = kept_tokens(scaled[rows], batch.top_k, batch.top_p, batch.width)
    if batch.greedy_rows is not None:  # in place through a view: a boolean index would sync with a GPU
        kept[:, 1:].logical_and_(~batch.greedy_rows[:, None])
    return kept
