"""Embeddings (``LLM.embed``): transformers' last hidden states pooled as the docs say (the last token's, normalized;
the mean), texts of any length packed into token-budget batches, and mistakes refused by name."""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM
from engine.pooling import greedy_groups
from tests.helpers import rel_err

ENGINE = dict(backend="torch", dtype="float32", device="cpu", progress=False)


def random_texts(n: int) -> list[list[int]]:
    return [[random.randrange(50256) for _ in range(random.randint(1, 40))] for _ in range(n)]


def last_hidden_states(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].double()


def test_embeddings_pool_transformers_last_hidden_states(tiny_checkpoint, hf_model):
    llm = LLM(str(tiny_checkpoint), max_num_seqs=4, max_num_batched_tokens=48, **ENGINE)  # several batches
    texts = random_texts(7)
    last = llm.embed(texts)
    mean = llm.embed(texts, pooling="mean", normalize=False)
    for ids, a, b in zip(texts, last, mean):
        states = last_hidden_states(hf_model, ids)
        assert a.prompt_token_ids == ids and len(a.outputs.embedding) == hf_model.config.n_embd
        assert rel_err(torch.tensor(a.outputs.embedding), torch.nn.functional.normalize(states[-1], dim=0)) < 1e-5
        assert rel_err(torch.tensor(b.outputs.embedding), states.mean(0)) < 1e-5


def test_batches_hold_the_budget_and_keep_the_order():
    lengths = [random.randint(1, 50) for _ in range(60)]
    budget = random.randint(20, 80)
    groups = list(greedy_groups(lengths, budget))
    assert [i for group in groups for i in group] == list(range(60))
    assert all(len(g) == 1 or sum(lengths[i] for i in g) <= budget for g in groups)
    assert all(sum(lengths[i] for i in a) + lengths[b[0]] > budget for a, b in zip(groups, groups[1:]))
    size = random.randint(1, 4)  # and at most ``size`` items a group, cut only where the budget or the size says
    groups = list(greedy_groups(lengths, budget, max_size=size))
    assert [i for group in groups for i in group] == list(range(60))
    assert all(len(g) <= size and (len(g) == 1 or sum(lengths[i] for i in g) <= budget) for g in groups)
    assert all(
        len(a) == size or sum(lengths[i] for i in a) + lengths[b[0]] > budget for a, b in zip(groups, groups[1:])
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(pooling="max"), "pooling must be one of"), (dict(normalize=1), "normalize must be a bool"),
     (dict(texts=[[1] * 200]), "text 0 has 200 tokens, more than the context of 128"),
     (dict(texts=[[1, 2], []]), "text 1 is empty")],
)  # fmt: skip
def test_mistakes_are_refused_by_name(tiny_checkpoint, kwargs, match):
    llm = LLM(str(tiny_checkpoint), **ENGINE)
    texts = kwargs.pop("texts", [[1, 2, 3]])
    with pytest.raises(ValueError, match=match):
        llm.embed(texts, **kwargs)
