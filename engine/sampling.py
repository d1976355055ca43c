"""Sampling parameters (vLLM's names and meanings) and the batched sampler.

The sampler draws with the exponential-race trick (``argmax(probs / Exponential(1))``, as gpt-fast and
nano-vllm do): it needs no host sync, and because each seeded request draws its noise from its own
``torch.Generator``, its samples do not depend on what else is in the batch or where it sits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # most alternatives a request may ask for per token (vLLM's default limit)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0


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


def apply_repetition_penalty(logits: torch.Tensor, seen: list[torch.Tensor], penalties: list[float]) -> None:
    """CTRL's penalty in place: divide positive logits of seen tokens by p, multiply negative ones by p."""
    for i, (tokens, p) in enumerate(zip(seen, penalties)):
        if p == 1.0 or tokens.numel() == 0:
            continue
        row = logits[i]
        vals = row[tokens]
        row[tokens] = torch.where(vals > 0, vals / p, vals * p)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus (top-p) sets with -inf; ``top_k`` 0 means off.

    ``logits`` [B, V] fp32 (already divided by temperature); ``top_k`` [B] int64; ``top_p`` [B] fp32.
    Only the ``max(top_k)`` largest logits are sorted when every row has a top-k (the common case).
    """
    V = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)
    width = int(k.max())
    sorted_logits, order = logits.topk(width, dim=-1) if width < V else logits.sort(dim=-1, descending=True)
    rank = torch.arange(width, device=logits.device)
    drop = rank[None, :] >= k[:, None]
    # nucleus: keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]
    kept = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, kept)


class Sampler:
    """Turns one step's logits of a batch into next tokens (and their logprobs)."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        seen: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits`` [B, V] fp32 (modified in place). Returns ``(tokens [B], logprobs [B, V])``.

        ``logprobs`` are the model's log-probabilities after the repetition penalty and before temperature
        and truncation, as vLLM reports them.
        """
        if seen is not None and any(p.repetition_penalty != 1.0 for p in params):
            apply_repetition_penalty(logits, seen, [p.repetition_penalty for p in params])
        logprobs = torch.log_softmax(logits, dim=-1)
        greedy_tokens = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy_tokens, logprobs
        device = logits.device
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
        scaled = logits / temps[:, None]
        truncated = [i for i, p in enumerate(params) if p.top_k_enabled or p.top_p < 1.0]
        if truncated:  # only those rows: one row without top-k would make filter_logits sort every row
            rows = torch.tensor(truncated, device=device)
            top_k = torch.tensor([max(params[i].top_k, 0) for i in truncated], device=device)
            top_p = torch.tensor([float(params[i].top_p) for i in truncated], device=device)
            scaled[rows] = filter_logits(scaled[rows], top_k, top_p)
        probs = scaled.softmax(dim=-1)
        noise = torch.empty_like(probs)
        for i, g in enumerate(generators):
            noise[i].exponential_(generator=g)
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([p.greedy for p in params], device=device)
        return torch.where(is_greedy, greedy_tokens, sampled), logprobs
