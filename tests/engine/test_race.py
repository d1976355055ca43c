"""The exponential race that draws sampled tokens (``engine/race.py``): its noise, its argmax, the distribution it
samples on both of its paths (on the host with numpy, on the device in tensor ops), exactly which noise a seeded row
draws, and seeded rows sampling the same whatever the batch."""

from __future__ import annotations

import math
import random

import pytest
import torch

from engine import race
from engine.race import exponential_
from engine.sampling import Sampler, filter_logits
from engine.sampling_params import SamplingParams


@pytest.fixture(params=["host", "device"])
def path(request, monkeypatch) -> str:
    """Which race the CPU runs: numpy's on the host, or the GPU's tensor ops (as on a CPU without numpy)."""
    if request.param == "device":
        monkeypatch.setattr(race, "np", None)
    return request.param


@pytest.mark.parametrize("shape", [(1, 7), (3, 4099), (2, 50257)])
@pytest.mark.parametrize("seeded", [False, True])
def test_exponential_noise_is_minus_log_of_the_generators_uniforms(shape, seeded):
    """The race's noise on the CPU is ``-log(u)`` of the float32 uniforms the same generator gives (computed here in
    float64), for a whole batch and for one row of it (a seeded request's row), and leaves the generator where
    those uniforms leave it, so seeded requests keep their samples whatever the batch."""
    seed = random.randrange(1 << 31)
    want_gen = torch.Generator().manual_seed(seed) if seeded else None
    got_gen = torch.Generator().manual_seed(seed) if seeded else None
    torch.manual_seed(seed)
    want = torch.empty(shape).uniform_(generator=want_gen).double().log().neg()
    want_next = torch.rand(3, generator=want_gen)
    torch.manual_seed(seed)
    got = exponential_(torch.full(shape, float("nan")), generator=got_gen)
    assert got.dtype == torch.float32 and (got > 0).all()
    assert torch.allclose(got.double(), want, rtol=2e-7, atol=0)
    assert torch.equal(torch.rand(3, generator=got_gen), want_next)
    rows = torch.full((3, shape[-1]), float("nan"))
    torch.manual_seed(seed)
    exponential_(rows[1], generator=got_gen)
    torch.manual_seed(seed)
    u = torch.empty(shape[-1]).uniform_(generator=want_gen)  # where got_gen stood: both drew the same so far
    assert torch.allclose(rows[1].double(), u.double().log().neg(), rtol=2e-7, atol=0)
    assert rows[0].isnan().all() and rows[2].isnan().all()


def test_exponential_noise_has_the_exponential_distribution():
    """200k draws: the mean is 1 and P(E > t) is exp(-t) at a few points, each within 5 standard errors. A uniform
    of 0 (one draw in 2**24, so in about one run in 80 of this test) gives inf, left out of the mean."""
    n = 200_000
    generator = torch.Generator().manual_seed(random.randrange(1 << 31))
    draws = exponential_(torch.full((4, n // 4), float("nan")), generator=generator)
    finite = draws[draws.isfinite()]
    assert n - len(finite) <= 2 and not draws.isnan().any()  # three infs: a chance of 3e-7
    assert abs(finite.double().mean().item() - 1.0) < 5 / n**0.5  # Exp(1) has standard deviation 1
    for t in (0.01, 0.5, 1.0, 3.0, 8.0):
        p = math.exp(-t)
        assert abs((draws > t).double().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_row_argmax_is_torchs_argmax():
    """numpy's argmax on the CPU picks what torch's does: the first of tied maxima (small integers make many), a NaN
    over any number, on contiguous rows and on a transposed view."""
    x = torch.randint(0, 4, (random.randint(50, 300), random.randint(2, 130))).float()
    x[random.randrange(x.shape[0]), random.randrange(x.shape[1])] = float("nan")
    assert torch.equal(race.row_argmax(x), x.argmax(dim=-1))
    assert torch.equal(race.row_argmax(x.T), x.T.argmax(dim=-1))


def nucleus(row: torch.Tensor, p: float) -> list[int]:
    """The smallest set of most likely tokens whose mass reaches ``p`` (``row``'s values distinct)."""
    order = row.argsort(descending=True).tolist()
    mass = row[order].double().softmax(-1).cumsum(-1)
    return order[: int((mass < p).sum()) + 1]


def test_sampler_draws_from_the_filtered_distribution(path):
    """One batch of rows with top-k, rows with top-p and rows without either: each group's empirical frequencies
    over 20k draws match softmax(logits / T) over its kept set, and nothing outside that set is drawn."""
    V, draws, T = 12, 20000, 0.7
    logits = torch.randn(V) * 2
    mass = (logits / T).double().softmax(-1).sort(descending=True).values.cumsum(-1)
    j = random.randrange(1, 5)
    top_p = float(mass[j - 1] + mass[j]) / 2  # halfway between two prefixes' masses: keeps j + 1 tokens
    groups = {
        "top_k": (SamplingParams(temperature=T, top_k=5), logits.topk(5).indices.tolist()),
        "top_p": (SamplingParams(temperature=T, top_p=top_p), nucleus(logits / T, top_p)),
        "none": (SamplingParams(temperature=T), list(range(V))),
    }
    params = [p for p, _ in groups.values() for _ in range(draws)]
    torch.manual_seed(random.randrange(1 << 30))
    tokens, _ = Sampler()(logits.expand(len(params), V).clone(), params, [None] * len(params))
    for g, (_, kept) in enumerate(groups.values()):
        want = torch.zeros(V)
        want[kept] = (logits[kept] / T).softmax(-1)
        freq = torch.bincount(tokens[g * draws : (g + 1) * draws], minlength=V).float() / draws
        assert set(torch.nonzero(freq).flatten().tolist()) <= set(kept)
        assert (freq - want).abs().max() < 0.02  # ~5 sigma at 20k draws


def test_host_race_gives_each_kept_token_its_own_noise_in_token_order():
    """The host race on random masks: the global generator's uniforms go to the kept tokens row by row in token
    order, a seeded row's to its own kept tokens from its own generator; each row's token is the float64 argmax of
    ``scaled - log(-log(u))`` over its kept tokens."""
    B, V = random.randint(3, 40), random.randint(5, 300)
    scaled = torch.randn(B, V) * 3
    kept = torch.rand(B, V) < random.choice([0.05, 0.5])
    kept[torch.arange(B), torch.randint(0, V, (B,))] = True
    seeds = {i: random.randrange(1 << 30) for i in random.sample(range(B), B // 2)}
    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    got = race.host_race(scaled, kept, [(i, torch.Generator().manual_seed(s)) for i, s in seeds.items()])
    torch.manual_seed(seed)
    u = torch.empty(int(kept.sum())).uniform_().double()
    counts = kept.sum(1).tolist()
    starts = [sum(counts[:i]) for i in range(B)]
    for i, s in seeds.items():
        u[starts[i] : starts[i] + counts[i]] = torch.empty(counts[i]).uniform_(
            generator=torch.Generator().manual_seed(s)
        )
    for i in range(B):
        tokens = kept[i].nonzero().flatten()
        keys = scaled[i, tokens].double() - u[starts[i] : starts[i] + counts[i]].log().neg().log()
        assert got[i] == tokens[keys.argmax()]


def test_seeded_rows_sample_the_same_alone_and_in_any_batch(path):
    """Seeded rows, mixed with greedy, untruncated, top-k and top-p rows (seeded or not): each seeded sampled row's
    tokens over four steps are those it samples alone, and each greedy row's are its argmax."""
    V = random.randint(20, 200)
    kinds = [dict(temperature=0.0), dict(), dict(top_k=random.randint(1, 5)), dict(top_p=0.7), dict(top_k=8, top_p=0.9)]
    # each kind seeded and unseeded, then a few more at random, in random order
    rows = [(kind, seeded) for kind in kinds for seeded in (True, False)]
    rows += random.choices(rows, k=random.randint(0, 10))
    random.shuffle(rows)
    params = [SamplingParams(seed=random.randrange(1 << 30) if seeded else None, **kind) for kind, seeded in rows]
    B = len(params)
    logits = torch.randn(4, B, V) * 3

    def generators(rows):
        return [torch.Generator().manual_seed(params[i].seed) if params[i].seed is not None else None for i in rows]

    sampler, batch_gens = Sampler(), generators(range(B))
    in_batch = torch.stack([sampler(logits[s].clone(), params, batch_gens)[0] for s in range(4)])
    for i in range(B):
        if params[i].greedy:  # whatever it keeps for the race, a greedy row takes its argmax
            assert torch.equal(in_batch[:, i], logits[:, i].argmax(dim=-1))
            continue
        if params[i].seed is None:
            continue
        (gen,) = generators([i])
        alone = [sampler(logits[s, i : i + 1].clone(), [params[i]], [gen])[0].item() for s in range(4)]
        assert in_batch[:, i].tolist() == alone, params[i]


def test_a_row_of_bad_logits_leaves_the_others_sampling(path):
    """A row of NaN, inf or -inf logits (a broken checkpoint's) gets some token; the batch's other rows still sample
    from their own kept sets."""
    V = random.randint(8, 64)
    logits = torch.randn(6, V) * 3
    bad = random.sample(range(6), 3)
    for row, value in zip(bad, [float("nan"), float("inf"), float("-inf")]):
        logits[row] = value
    top_k = random.choice([0, 3])
    params = [SamplingParams(temperature=0.8, top_p=0.5, top_k=top_k)] * 6
    tokens, _ = Sampler()(logits.clone(), params, [None] * 6)
    assert ((tokens >= 0) & (tokens < V)).all()
    kept = filter_logits(logits / 0.8, torch.full((6,), top_k), torch.full((6,), 0.5)).isfinite()
    for row in set(range(6)) - set(bad):
        assert kept[row, tokens[row]]
