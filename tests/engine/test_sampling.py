"""Sampling: parameter validation, top-k / top-p masks, the sampler's distribution, the paged block allocator."""

from __future__ import annotations

import random

import pytest
import torch

from engine.sampling import Sampler, SamplingParams, apply_repetition_penalty, filter_logits


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0), ("n", 1.5), ("max_tokens", 0), ("max_tokens", True), ("temperature", -0.1),
        ("temperature", float("inf")), ("temperature", "hot"), ("top_k", -2), ("top_k", 2.0), ("top_p", 0.0),
        ("top_p", 1.5), ("repetition_penalty", 0.0), ("stop", ""), ("stop", [1]), ("stop_token_ids", [-1]),
        ("stop_token_ids", "3"), ("ignore_eos", "yes"), ("seed", 1.5), ("logprobs", -1),
    ],
)  # fmt: skip
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_params_defaults_follow_vllm():
    p = SamplingParams(stop="###", top_k=-1)
    assert p.stop == ["###"] and not p.top_k_enabled and not p.greedy
    assert SamplingParams(temperature=0).greedy


def reference_filter(row: torch.Tensor, k: int, p: float) -> set[int]:
    """The kept set, by the definitions: top-k first, then the smallest prefix with mass >= p."""
    order = row.argsort(descending=True).tolist()
    if k > 0:
        order = order[:k]
    probs = row[order].double().softmax(-1).tolist()
    kept, mass = [], 0.0
    for idx, pr in zip(order, probs):
        kept.append(idx)
        mass += pr
        if mass >= p:
            break
    return set(kept)


@pytest.mark.parametrize("V", [7, 1000])
def test_filter_logits_matches_definition(V):
    B = 6
    logits = torch.randn(B, V) * 3
    top_k = torch.tensor([0, 1, 3, 5, 0, random.randint(1, V)])
    top_p = torch.tensor([1.0, 1.0, 0.5, 0.9, 0.3, random.uniform(0.05, 1.0)])
    out = filter_logits(logits.clone(), top_k, top_p)
    for b in range(B):
        kept = set(torch.nonzero(out[b] > float("-inf")).flatten().tolist())
        k, p = int(top_k[b]), float(top_p[b])
        # fp32 cumulative sums may land either side of p when a prefix's mass is within rounding of it
        assert reference_filter(logits[b], k, p - 1e-5) <= kept <= reference_filter(logits[b], k, p + 1e-5)
        assert torch.equal(out[b][list(kept)], logits[b][list(kept)])


def test_sampler_draws_from_the_filtered_distribution():
    """Empirical frequencies of 20k seeded draws match softmax(logits / T) over the top-k set."""
    V, draws, T, k = 12, 20000, 0.7, 5
    logits = torch.randn(V) * 2
    params = [SamplingParams(temperature=T, top_k=k)] * draws
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    # one generator shared by all rows is fine here: we test the distribution, not independence
    tokens, _ = Sampler()(logits.expand(draws, V).clone(), params, [gen] * draws)
    top = logits.topk(k).indices
    want = torch.zeros(V)
    want[top] = (logits[top] / T).softmax(-1)
    freq = torch.bincount(tokens, minlength=V).float() / draws
    assert set(torch.nonzero(freq).flatten().tolist()) <= set(top.tolist())
    assert (freq - want).abs().max() < 0.02  # ~4 sigma at 20k draws


def test_greedy_rows_take_the_argmax_and_logprobs_are_normalized():
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0)]
    tokens, logprobs = Sampler()(logits.clone(), params, [None, torch.Generator().manual_seed(1), None])
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert torch.allclose(logprobs.exp().sum(-1), torch.ones(3), atol=1e-5)


def test_repetition_penalty_follows_ctrl():
    logits = torch.randn(2, 10)
    seen = [torch.tensor([1, 4]), torch.tensor([], dtype=torch.long)]
    out = logits.clone()
    apply_repetition_penalty(out, seen, [1.3, 1.3])
    for t in (1, 4):
        v = logits[0, t]
        assert out[0, t] == pytest.approx((v / 1.3 if v > 0 else v * 1.3).item())
    mask = torch.ones(10, dtype=torch.bool)
    mask[[1, 4]] = False
    assert torch.equal(out[0, mask], logits[0, mask]) and torch.equal(out[1], logits[1])
