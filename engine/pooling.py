"""Embeddings of whole texts from GPT-2's final hidden states: vLLM's pooling (``LLM.embed``, ``/v1/embeddings``).

GPT-2 was not trained for embeddings; like vLLM serving a decoder as an embedding model, the default pools the last
token's final hidden state (the only one that has read the whole text) and L2-normalizes it; ``pooling="mean"``
averages every token's. They run outside the scheduler: whole texts, nothing cached, packed into batches of at most
``max_num_batched_tokens`` tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from engine.lora import LoRARequest

POOLINGS = ("last", "mean")


def greedy_groups(costs: list[int], budget: int, max_size: int | None = None) -> Iterator[list[int]]:
    """Indices of items of ``costs``, in order, grouped so that each group's costs add up to at most ``budget`` (an
    item over it alone) and it holds at most ``max_size`` items (and at least one): sequences by their tokens
    against a step's token budget, say."""
    group, total = [], 0
    for i, cost in enumerate(costs):
        if group and (total + cost > budget or (max_size is not None and len(group) >= max_size)):
            yield group
            group, total = [], 0
        group.append(i)
        total += cost
    if group:
        yield group


def check_pooling(pooling: str, normalize: bool) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be a bool, got {normalize!r}")


def hidden_states(
    engine, token_lists: list[list[int]], lora_request: LoRARequest | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(i, final hidden states [T_i, D])`` of each token list, whole and nothing cached, computed in batches of
    at most ``max_num_batched_tokens`` tokens (features, embeddings)."""
    lengths = [len(ids) for ids in token_lists]
    for group in greedy_groups(lengths, engine.max_num_batched_tokens):
        hidden = engine.runner.hidden_states([token_lists[i] for i in group], lora_request)
        yield from zip(group, hidden.split([lengths[i] for i in group]))


def embed(
    engine, token_lists: list[list[int]], pooling: str = "last", normalize: bool = True,
    lora_request: LoRARequest | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """One fp32 vector ``[d_model]`` per token list (on the CPU), as :func:`check_pooling`'s arguments ask; ``engine``
    is an :class:`engine.llm_engine.LLMEngine` and the lists are checked against its context already."""
    out: list[torch.Tensor] = [None] * len(token_lists)  # type: ignore[list-item]
    for i, states in hidden_states(engine, token_lists, lora_request):
        vector = (states[-1] if pooling == "last" else states.float().mean(0)).float()
        out[i] = (torch.nn.functional.normalize(vector, dim=0) if normalize else vector).cpu()
    return out
