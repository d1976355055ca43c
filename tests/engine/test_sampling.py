"""Sampling: parameter validation, top-k / top-p masks (ties included), greedy rows and logprobs, the logit
processing (bias, min_tokens, penalties) against a per-row float64 reference, and min_tokens in the stop conditions.
The race that draws the sampled tokens: ``test_race.py``."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch

from engine import sampling
from engine.logits_processing import process_logits
from engine.output_processor import OutputProcessor
from engine.sampling import Sampler, SamplingBatch, _kept, filter_logits
from engine.sampling_params import SamplingParams
from engine.sequence import Request, Sequence
from tests.helpers import History, reference_processed, rel_err


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0), ("n", 1.5), ("max_tokens", 0), ("max_tokens", True), ("temperature", -0.1),
        ("temperature", float("inf")), ("temperature", "hot"), ("top_k", -2), ("top_k", 2.0), ("top_p", 0.0),
        ("top_p", 1.5), ("repetition_penalty", 0.0), ("stop", ""), ("stop", [1]), ("stop_token_ids", [-1]),
        ("stop_token_ids", "3"), ("ignore_eos", "yes"), ("seed", 1.5), ("logprobs", -1),
        ("presence_penalty", 2.01), ("presence_penalty", -2.5), ("presence_penalty", "1"),
        ("frequency_penalty", -2.01), ("frequency_penalty", float("nan")), ("frequency_penalty", True),
        ("logit_bias", [1, 2]), ("logit_bias", {1: 100.5}), ("logit_bias", {1: -101}), ("logit_bias", {1: "2"}),
        ("logit_bias", {1: float("nan")}), ("logit_bias", {"a": 1}), ("logit_bias", {"1.0": 1}),
        ("logit_bias", {" 1": 1}), ("logit_bias", {-1: 1}), ("logit_bias", {"-1": 1}), ("logit_bias", {1.0: 1}),
        ("logit_bias", {True: 1}), ("logit_bias", {"7": 1, 7: 2}), ("min_tokens", -1), ("min_tokens", 1.0),
        ("min_tokens", 17), ("min_p", -0.1), ("min_p", 1.5), ("min_p", "0.1"), ("min_p", True),
        ("min_p", float("nan")),
    ],
)  # fmt: skip
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_params_defaults_follow_vllm():
    p = SamplingParams(stop="###", top_k=-1)
    assert p.stop == ["###"] and not p.top_k_enabled and not p.greedy
    assert SamplingParams(temperature=0).greedy
    assert not p.modifies_logits and (p.presence_penalty, p.frequency_penalty, p.logit_bias, p.min_tokens) == (
        0.0, 0.0, None, 0)  # fmt: skip


def test_logit_bias_keys_from_json_become_ints():
    token, other = random.sample(range(50257), 2)
    bias = {str(token): random.uniform(-100, 100), other: -100}
    p = SamplingParams(logit_bias=bias)
    assert p.logit_bias == {token: bias[str(token)], other: -100.0}
    assert all(type(k) is int and type(v) is float for k, v in p.logit_bias.items())
    assert SamplingParams(max_tokens=3, min_tokens=3, presence_penalty=-2, frequency_penalty=2).min_tokens == 3


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


def assert_filtered_as_defined(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> None:
    """filter_logits keeps, in each row, the reference's set (unchanged values) and -inf elsewhere."""
    out = filter_logits(logits.clone(), top_k, top_p)
    for b in range(logits.shape[0]):
        kept = set(torch.nonzero(out[b] > float("-inf")).flatten().tolist())
        k, p = int(top_k[b]), float(top_p[b])
        # fp32 cumulative sums may land either side of p when a prefix's mass is within rounding of it
        assert reference_filter(logits[b], k, p - 1e-5) <= kept <= reference_filter(logits[b], k, p + 1e-5)
        assert torch.equal(out[b][list(kept)], logits[b][list(kept)])


@pytest.mark.parametrize("V", [7, 1000])
def test_filter_logits_matches_definition(V):
    B = 6
    logits = torch.randn(B, V) * 3
    top_k = torch.tensor([0, 1, 3, 5, 0, random.randint(1, V)])
    top_p = torch.tensor([1.0, 1.0, 0.5, 0.9, 0.3, random.uniform(0.05, 1.0)])
    assert_filtered_as_defined(logits, top_k, top_p)


@pytest.mark.parametrize("V", [1000, 50257])
def test_filter_logits_with_narrow_top_k(V):
    """Every row with a top-k far below V (``torch.topk`` rather than a sort of the whole row)."""
    B = 5
    logits = torch.randn(B, V) * 3
    top_k = torch.randint(1, 20, (B,))
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.2, random.uniform(0.05, 1.0)])
    assert_filtered_as_defined(logits, top_k, top_p)


@pytest.mark.parametrize("V", [128, 1000])
def test_filter_logits_same_without_numpy(V, monkeypatch):
    """numpy is optional (the fast CPU sort when installed): torch's sort must give the same filtered logits."""
    B = 6
    logits = torch.randn(B, V) * 3
    logits[0, : V // 2] = logits[0, V // 2 :]  # ties
    top_k = torch.tensor([0, 1, 3, V // 2, 0, random.randint(1, V)])
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.9, 0.3, random.uniform(0.05, 1.0)])
    with_numpy = filter_logits(logits.clone(), top_k, top_p)
    monkeypatch.setattr(sampling, "np", None)
    assert torch.equal(filter_logits(logits.clone(), top_k, top_p), with_numpy)
    assert torch.isinf(with_numpy).any() and torch.isfinite(with_numpy).any()


def test_top_p_one_keeps_every_token():
    """fp32 cumulative mass passes 1.0 well before the end of a 50257-wide row: top_p 1 must still keep every token
    (all of them, or exactly top_k)."""
    logits = torch.randn(3, 50257) * torch.tensor([[1.0], [3.0], [6.0]])
    out = filter_logits(logits.clone(), torch.tensor([0, 0, 40000]), torch.ones(3))
    assert torch.equal(out[:2], logits[:2])
    assert torch.isfinite(out[2]).sum() == 40000


def test_a_top_p_that_is_zero_in_fp32_keeps_the_top_token():
    """top_p = 5e-324 is valid (above 0) but 0 once in fp32: each row keeps its largest logit, as a tiny top_p does."""
    logits = torch.randn(4, 1000) * 3
    out = filter_logits(logits.clone(), torch.tensor([0, 0, 5, 1]), torch.tensor([5e-324, 1e-46, 5e-324, 5e-324]))
    assert torch.equal(torch.isfinite(out).sum(-1), torch.ones(4, dtype=torch.long))
    assert torch.equal(out.argmax(-1), logits.argmax(-1))


def stable_order(row: torch.Tensor) -> list[int]:
    """Token ids by descending logit, equal logits by ascending id (a stable sort's order)."""
    return sorted(range(row.shape[0]), key=lambda t: (-row[t].item(), t))


@pytest.mark.parametrize("V,narrow", [(7, False), (128, False), (128, True)])
def test_filter_logits_breaks_ties_by_token_id(V, narrow):
    """Logits with many ties (as bf16 logits have): top-k keeps exactly k tokens and the nucleus exactly its prefix's
    length, taking equal logits by ascending token id; nothing is kept beyond the prefix. ``narrow``: every row's
    top-k the same small k, so that tokens tied with the cut lie beyond the k largest values the filter sorts."""
    B = 8
    logits = torch.randint(-2, 3, (B, V)).float() * 1.5
    top_k = torch.tensor([1, 2, 3, 0] + [random.randint(1, V) for _ in range(B - 4)])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.5] + [random.choice([1.0, random.uniform(0.05, 1.0)]) for _ in range(B - 4)])
    if narrow:
        top_k, top_p = torch.full((B,), random.randint(1, 3)), torch.ones(B)
    out = filter_logits(logits.clone(), top_k, top_p)
    for b in range(B):
        order = stable_order(logits[b])
        kept = torch.nonzero(torch.isfinite(out[b])).flatten().tolist()
        assert sorted(kept) == sorted(order[: len(kept)])
        k, p = int(top_k[b]), float(top_p[b])
        lo, hi = len(reference_filter(logits[b], k, p - 1e-5)), len(reference_filter(logits[b], k, p + 1e-5))
        assert lo <= len(kept) <= hi
        if p == 1.0 and k:
            assert len(kept) == min(k, V)


def test_greedy_rows_take_the_argmax_and_logprobs_are_normalized():
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0)]
    tokens, logprobs = Sampler()(logits.clone(), params, [None, torch.Generator().manual_seed(1), None])
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert torch.allclose(logprobs.exp().sum(-1), torch.ones(3), atol=1e-5)


def test_the_race_candidates_of_each_kind_of_row():
    """What each row puts in the race when some rows truncate: a truncating row its top-k / top-p set, a sampled row
    without truncation every token, a greedy row its first token only (its sample is thrown away)."""
    V = random.randint(10, 300)
    kinds = [dict(temperature=0.0), dict(temperature=0.9), dict(temperature=0.9, top_p=0.8), dict(top_k=3)]
    params = [SamplingParams(**random.choice(kinds)) for _ in range(random.randint(4, 20))] + [
        SamplingParams(**kind) for kind in kinds
    ]
    B = len(params)
    batch = SamplingBatch.of(params, [None] * B, V, torch.device("cpu"))
    scaled = torch.randn(B, V) * 3
    kept = _kept(scaled, batch)
    filtered = filter_logits(scaled, torch.tensor([p.top_k for p in params]), torch.tensor([p.top_p for p in params]))
    for i, p in enumerate(params):
        if p.greedy:
            assert kept[i].nonzero().flatten().tolist() == [0]
        else:
            assert torch.equal(kept[i], filtered[i].isfinite())


def test_min_p_keeps_what_transformers_min_p_warper_keeps():
    """Rows of every kind in one batch: a sampled row keeps what transformers' warpers keep in their order
    (temperature, top-k, top-p, then ``MinPLogitsWarper`` on what is left), tokens within rounding of a row's floor
    aside; a greedy row keeps its first token."""
    from transformers.generation.logits_process import MinPLogitsWarper

    V = random.randint(50, 2000)
    kinds = [dict(temperature=0.0, min_p=0.5), dict(temperature=0.7), dict(temperature=1.3, min_p=0.2),
             dict(temperature=0.9, top_k=20, min_p=0.05), dict(top_p=0.9, min_p=0.3), dict(min_p=1.0)]  # fmt: skip
    params = [SamplingParams(**kind) for kind in kinds]
    params += [SamplingParams(**random.choice(kinds), seed=random.randrange(9)) for _ in range(random.randint(2, 12))]
    batch = SamplingBatch.of(params, [None] * len(params), V, torch.device("cpu"))
    scaled = torch.randn(len(params), V) * 3 / batch.temperatures[:, None]
    kept = sampling._with_min_p(scaled, _kept(scaled, batch), batch.log_min_p)
    for i, p in enumerate(params):
        if p.greedy:
            assert kept[i].nonzero().flatten().tolist() == [0]
            continue
        row = filter_logits(scaled[i : i + 1].clone(), torch.tensor([p.top_k]), torch.tensor([p.top_p]))
        if p.min_p:
            row = MinPLogitsWarper(p.min_p)(None, row)
        ratio = (scaled[i].double() - scaled[i].double().max()).exp()
        clear = (ratio.log() - math.log(p.min_p)).abs() > 1e-5 if p.min_p else torch.ones(V, dtype=torch.bool)
        assert torch.equal(kept[i][clear], row[0].isfinite()[clear])
        assert kept[i][scaled[i].argmax()]


def test_sampling_probs_are_what_transformers_warpers_leave():
    """The distribution each row is drawn from (what speculative decoding's rejection sampling compares): a sampled
    row's is the softmax of what transformers' warpers leave in their order (temperature, top-k, top-p, min-p), in
    float64; a greedy row's is all on its argmax."""
    from transformers.generation import logits_process as hf

    V = random.randint(50, 2000)
    kinds = [dict(temperature=0.0), dict(temperature=0.7), dict(temperature=1.3, min_p=0.2), dict(top_k=20),
             dict(temperature=0.9, top_k=20, top_p=0.8, min_p=0.05), dict(top_p=0.9)]  # fmt: skip
    params = [SamplingParams(**kind) for kind in kinds] + [SamplingParams(**random.choice(kinds)) for _ in range(6)]
    batch = SamplingBatch.of(params, [None] * len(params), V, torch.device("cpu"))
    logits = torch.randn(len(params), V) * 3
    probs = sampling.sampling_probs(logits, batch)
    for i, p in enumerate(params):
        if p.greedy:
            assert probs[i].nonzero().flatten().tolist() == [int(logits[i].argmax())]
            continue
        row = hf.TemperatureLogitsWarper(p.temperature)(None, logits[i : i + 1].double())
        if p.top_k > 0:
            row = hf.TopKLogitsWarper(p.top_k)(None, row)
        if p.top_p < 1.0:
            row = hf.TopPLogitsWarper(p.top_p)(None, row)
        if p.min_p > 0:
            row = hf.MinPLogitsWarper(p.min_p)(None, row)
        torch.testing.assert_close(probs[i].double(), row[0].softmax(-1), atol=1e-6, rtol=1e-5)


def test_min_p_through_the_engine(tiny_checkpoint):
    """Every sampled token is at least ``min_p`` times as likely as the most likely one (temperature 1: the
    logprobs are the sampled distribution's), and the samples are not all the favourite."""
    from engine import LLM

    llm = LLM(str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu", progress=False)
    min_p = random.uniform(0.1, 0.3)
    params = SamplingParams(n=32, max_tokens=4, min_p=min_p, logprobs=1, ignore_eos=True)
    out = llm.generate([random.randrange(50256) for _ in range(8)], params, use_tqdm=False)[0]
    steps = [(d, t) for c in out.outputs for d, t in zip(c.logprobs, c.token_ids)]
    assert all(d[t] >= max(d.values()) + math.log(min_p) - 1e-5 for d, t in steps)
    assert any(d[t] < max(d.values()) for d, t in steps)


@pytest.fixture(scope="module")
def tiny_llm(tiny_checkpoint):
    from engine import LLM

    return LLM(str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu", progress=False)


def test_allowed_token_ids_are_all_that_is_sampled(tiny_llm):
    allowed = random.sample(range(50256), random.randint(2, 6))
    params = SamplingParams(n=16, max_tokens=4, allowed_token_ids=allowed, logprobs=8, ignore_eos=True)
    out = tiny_llm.generate([random.randrange(50256) for _ in range(6)], params, use_tqdm=False)[0]
    assert all(set(c.token_ids) <= set(allowed) for c in out.outputs)
    assert all(set(d) <= set(allowed) for c in out.outputs for d in c.logprobs)  # the rest cannot be drawn
    assert len({t for c in out.outputs for t in c.token_ids}) > 1  # sampled, not one token forced
    prompt = [random.randrange(50256) for _ in range(6)]
    greedy = SamplingParams(max_tokens=1, temperature=0)
    favourite = tiny_llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids[0]
    others = [t for t in allowed if t != favourite]
    chosen = tiny_llm.generate(prompt, replace(greedy, allowed_token_ids=others + [favourite]), use_tqdm=False)
    assert chosen[0].outputs[0].token_ids == [favourite]
    with pytest.raises(ValueError, match="allowed_token_ids token id 50257"):
        tiny_llm.generate(prompt, replace(greedy, allowed_token_ids=[50257]))
    for bad in ([], [-1], "12", [1.0]):
        with pytest.raises(ValueError, match="allowed_token_ids"):
            SamplingParams(allowed_token_ids=bad)


def test_bad_words_are_never_completed(tiny_llm):
    """A two-token word the plain greedy output writes: with it banned, the output is the same until the plain one
    completes the word (or its spelling after a space), and never completes either."""
    tok = tiny_llm.get_tokenizer()
    plain = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for _ in range(50):
        prompt = [random.randrange(50256) for _ in range(6)]
        ids = tiny_llm.generate(prompt, plain, use_tqdm=False)[0].outputs[0].token_ids
        pairs = [j for j in range(len(ids) - 1) if tok.encode(tok.decode(ids[j : j + 2])) == ids[j : j + 2]]
        if pairs:
            break
    word = tok.decode(ids[pairs[0] : pairs[0] + 2])
    out = tiny_llm.generate(prompt, replace(plain, bad_words=[word]), use_tqdm=False)[0].outputs[0].token_ids
    spellings = [tok.encode(word), tok.encode(" " + word.lstrip(" "))]
    first = min(k + len(w) - 1 for w in spellings for k in range(len(ids)) if ids[k : k + len(w)] == w)
    assert out[:first] == ids[:first] and out[first] != ids[first]  # the same until the plain output ends a word
    assert not any(out[k : k + len(w)] == w for w in spellings for k in range(len(out)))
    for bad in (["ok", ""], "word", [3]):
        with pytest.raises(ValueError, match="bad_words"):
            SamplingParams(bad_words=bad)


def test_include_stop_str_in_output_keeps_the_stop(tiny_llm):
    """A stop string, then a stop token, met half way through a greedy completion: the text ends before it, or with
    it when ``include_stop_str_in_output``."""
    tok = tiny_llm.get_tokenizer()
    prompt = [random.randrange(50256) for _ in range(6)]
    plain = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    ids = tiny_llm.generate(prompt, plain, use_tqdm=False)[0].outputs[0].token_ids
    j = random.randrange(4, 12)
    stop = tok.decode(ids[j : j + 2])
    for params, kept in [(replace(plain, stop=[stop]), stop), (replace(plain, stop_token_ids=[ids[j]]), None)]:
        cut = tiny_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        whole = tiny_llm.generate(prompt, replace(params, include_stop_str_in_output=True), use_tqdm=False)
        whole = whole[0].outputs[0]
        kept = kept if kept is not None else tok.decode(whole.token_ids[-1:])
        assert whole.text == cut.text + kept and whole.finish_reason == cut.finish_reason == "stop"
        assert whole.stop_reason == cut.stop_reason


def assert_processed(got: torch.Tensor, want: torch.Tensor) -> None:
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite) and (got[~finite] == float("-inf")).all()
    assert rel_err(got[finite], want[finite]) < 1e-6


def random_row_params(pool: list[int], V: int, features: set[str], num_outputs: int) -> SamplingParams:
    kw = {}
    if "penalties" in features:
        kw.update(presence_penalty=random.uniform(-2, 2), frequency_penalty=random.uniform(-2, 2))
    if "repetition" in features:
        kw.update(repetition_penalty=random.uniform(0.5, 2.0))
    if "bias" in features:
        tokens = random.sample(range(V), random.randint(1, 6)) + [random.choice(pool)]
        kw.update(logit_bias={t: random.choice([random.uniform(-5, 5), 100, -100]) for t in tokens})
    if "min_tokens" in features:
        kw.update(min_tokens=random.randint(0, 2 * num_outputs + 1), stop_token_ids=random.sample(pool, 2),
                  ignore_eos=random.random() < 0.3)  # fmt: skip
    return SamplingParams(max_tokens=64, temperature=random.choice([0.0, 0.8]), seed=random.randrange(1 << 20), **kw)


def test_process_logits_matches_the_reference_on_mixed_batches():
    """Random batches where each row uses any subset of bias / min_tokens / repetition / presence+frequency
    (negative penalties included), outputs drawn from a few tokens so they repeat, prompts sharing some of them:
    the processed logits, the sampler's logprobs and its greedy tokens match the float64 reference; rows using
    nothing are untouched, bit for bit."""
    V, B, eos = 97, 12, 96
    pool = random.sample(range(V - 1), 8)  # outputs repeat: 8 distinct tokens
    all_features = ["penalties", "repetition", "bias", "min_tokens"]
    rows = [set(), set(all_features)] + [{f for f in all_features if random.random() < 0.5} for _ in range(B - 2)]
    random.shuffle(rows)
    histories, params = [], []
    for features in rows:
        outputs = random.choices(pool, k=random.randint(0, 20))
        prompt = random.choices(range(V), k=random.randint(1, 10)) + random.choices(pool, k=random.randint(0, 3))
        histories.append(History(prompt, outputs))
        params.append(random_row_params(pool, V, features, len(outputs)))
    logits = torch.randn(B, V) * 3
    want = reference_processed(logits, params, histories, eos)
    got = logits.clone()
    process_logits(got, params, histories, eos)
    assert_processed(got, want)
    for row, features in enumerate(rows):
        if not features:
            assert torch.equal(got[row], logits[row])
    generators = [torch.Generator().manual_seed(p.seed) for p in params]
    tokens, logprobs = Sampler(eos)(logits.clone(), params, generators, histories)
    assert_processed(logprobs, want.log_softmax(-1))
    for row, p in enumerate(params):
        if p.greedy:
            assert tokens[row] == want[row].argmax()
        assert torch.isfinite(want[row, tokens[row]])  # a masked token is never sampled


def test_presence_and_frequency_count_the_output_only():
    """Output ``[a, a, a, b]`` after a prompt holding ``a`` and ``c``: a loses 3f + p, b loses f + p, c nothing."""
    V = 30
    a, b, c = random.sample(range(V), 3)
    f, p = random.uniform(-2, 2), random.uniform(-2, 2)
    logits = torch.randn(1, V)
    got = logits.clone()
    params = SamplingParams(frequency_penalty=f, presence_penalty=p)
    process_logits(got, [params], [History([c, a, c], [a, a, b, a])], None)
    want = logits.clone().double()
    want[0, a] -= 3 * f + p
    want[0, b] -= f + p
    assert rel_err(got, want) < 1e-6
    rest = [t for t in range(V) if t not in (a, b)]
    assert torch.equal(got[0, rest], logits[0, rest])


def test_repetition_penalty_follows_ctrl():
    logits = torch.randn(2, 10)
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(repetition_penalty=1.3)]
    out = logits.clone()
    process_logits(out, params, [History([1], [4]), History([], [])], None)
    for t in (1, 4):
        v = logits[0, t]
        assert out[0, t] == pytest.approx((v / 1.3 if v > 0 else v * 1.3).item())
    mask = torch.ones(10, dtype=torch.bool)
    mask[[1, 4]] = False
    assert torch.equal(out[0, mask], logits[0, mask]) and torch.equal(out[1], logits[1])


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_eos_and_stop_tokens_until_reached(ignore_eos):
    """Step by step: EOS (unless ignored) and the stop tokens are -inf exactly while fewer than min_tokens tokens
    were generated; nothing else changes, ever."""
    V, eos = 50, 49
    m = random.randint(1, 6)
    stops = random.sample(range(V - 1), 2)
    params = SamplingParams(max_tokens=m + 3, min_tokens=m, stop_token_ids=stops, ignore_eos=ignore_eos)
    masked = stops + ([] if ignore_eos else [eos])
    history = History(random.choices(range(V), k=5))
    for k in range(m + 3):
        logits = torch.randn(1, V)
        got = logits.clone()
        process_logits(got, [params], [history], eos)
        want = logits.clone()
        if k < m:
            want[0, masked] = float("-inf")
        assert torch.equal(got, want), k
        history.output_token_ids.append(random.choice([t for t in range(V) if t not in masked]))


def test_unused_features_need_no_history():
    """Plain rows (and logit_bias, which needs no tokens) sample without histories; penalties say what they need."""
    logits = torch.randn(3, 40)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias={"5": 100}), SamplingParams()]
    tokens, _ = Sampler(39)(logits.clone(), params, [None] * 3)
    assert tokens[0] == logits[0].argmax() and tokens[1] == 5
    with pytest.raises(ValueError, match="histories"):
        Sampler(39)(logits.clone(), [SamplingParams(min_tokens=1)] * 3, [None] * 3)


def make_seq(params: SamplingParams, tokenizer) -> Sequence:
    request = Request("r", "prompt", [1, 2, 3], params, detokenize=True)
    request.seqs.append(Sequence(0, request, 0))
    OutputProcessor(None).add_request(request, tokenizer)
    return request.seqs[0]


def test_min_tokens_defers_every_stop_condition(gpt2_tokenizer_dir):
    """With min_tokens m, EOS, a stop token or a stop string at any of the first m tokens does not end the
    sequence; at token m + 1 each does (a stop string must end in text of a token past the first m)."""
    from engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(gpt2_tokenizer_dir)
    eos = 50256
    text = random.choice([" the", " cat", " and", " hello"])
    (word,) = tokenizer.encode(text)
    m = random.randint(0, 5)
    for params, finish, stop_reason in [
        (SamplingParams(max_tokens=m + 3, min_tokens=m), "stop", None),
        (SamplingParams(max_tokens=m + 3, min_tokens=m, stop_token_ids=[word]), "stop", word),
        (SamplingParams(max_tokens=m + 3, min_tokens=m, stop=text), "stop", text),
        (SamplingParams(max_tokens=m + 3, min_tokens=m, ignore_eos=True), "length", None),
    ]:
        processor = OutputProcessor(eos)
        seq = make_seq(params, tokenizer)
        token = eos if params.stop is None and not params.stop_token_ids else word
        while not seq.is_finished:
            processor.append_token(seq, token, 0.0, None)
        expected_len = m + 3 if finish == "length" else m + 1
        assert (len(seq.output_token_ids), seq.finish_reason, seq.stop_reason) == (expected_len, finish, stop_reason)
        if params.stop:
            assert seq.text == text * m
