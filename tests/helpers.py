"""Helpers shared by the test modules (imported as ``tests.helpers``; fixtures stay in ``conftest.py``)."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Small but not degenerate: several heads, odd-ish widths, real GPT-2 vocabulary so text round-trips.
# initializer_range 0.2 (not 0.02) so greedy decoding of random weights wanders instead of repeating a token.
TINY = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=50257, initializer_range=0.2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ computed in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def assert_static_decode_matches_eager(make, max_num_seqs: int, prompts: list[list[int]], max_tokens: int):
    """Greedy decoding through fixed-size, padded buckets (the shapes a GPU replays as CUDA graphs, run eagerly
    here) chooses the tokens eager decoding does, with the same log-probs; returns the ``StaticDecoder``.

    ``make(max_num_seqs)`` builds an ``LLM``. Its buckets go up to ``max_num_seqs + 1``, so even a full batch
    decodes with a pad row; random lengths make the batch shrink too, so rows go from real to padding. The longest
    prompt gets ``max_tokens``: it fills an ``LLM``'s ``max_model_len`` of the longest prompt + ``max_tokens``,
    the buckets' width. The NaN-filled pool catches a pad row that stored, or a read of a slot that was never
    written.
    """
    from engine import SamplingParams
    from engine.cuda_graphs import StaticDecoder

    eager, static = make(max_num_seqs), make(max_num_seqs)
    decoder = StaticDecoder(static.model, static.kv, max_num_seqs + 1, static.device, False, static.max_model_len)
    static.runner.static_decoder = decoder
    static.kv.k.fill_(float("nan"))
    static.kv.v.fill_(float("nan"))
    padded = []  # per decode step: did its bucket have pad rows?
    decode = decoder.decode

    def noting_padding(input_ids, *rest):
        padded.append(decoder.bucket_size(len(input_ids)) > len(input_ids))
        return decode(input_ids, *rest)

    decoder.decode = noting_padding
    lengths = random.sample(range(2, max_tokens), len(prompts) - 1)
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    lengths.insert(longest, max_tokens)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0) for n in lengths]
    outs = eager.generate(prompts, params, use_tqdm=False), static.generate(prompts, params, use_tqdm=False)
    for a, b in zip(*outs, strict=True):
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.token_ids == cb.token_ids
        la = torch.tensor([d[t] for d, t in zip(ca.logprobs, ca.token_ids)])
        lb = torch.tensor([d[t] for d, t in zip(cb.logprobs, cb.token_ids)])
        assert rel_err(lb, la) < 1e-5
    assert any(padded), "no decode step ran with pad rows"
    return decoder


def tuning_every_config(kernel, configs, check=None):
    """``kernel`` (a ``triton.autotune`` kernel) rebuilt to tune over ``configs`` with a stand-in clock.

    The interpreter and ``GPT2_TRITON_AUTOTUNE=first`` keep one config, so Triton's tuning path (our prune
    function, our hooks, the winner's launch) and every config but the first would otherwise run on a GPU only.
    Here each config Triton benchmarks first goes to ``check(run)`` (``run()`` launches it once: the test
    poisons outputs, runs, compares), then runs three times, as ``do_bench`` repeats it, and gets a random
    time, so the winner varies. Returns the kernel and the list of configs' launchers it timed.
    """
    import triton

    timed = []

    def bench(kernel_call, quantiles):
        timed.append(kernel_call)
        if check is not None:
            check(kernel_call)
        for _ in range(3):
            kernel_call()
        return [random.random()] * len(quantiles)

    tuned = triton.autotune(
        configs=configs,
        key=kernel.keys,
        prune_configs_by={"early_config_prune": kernel.early_config_prune},
        pre_hook=kernel.pre_hook,
        post_hook=kernel.post_hook,
        do_bench=bench,
    )(kernel.fn)
    return tuned, timed


def make_hf_model(**overrides):
    """A transformers GPT2LMHeadModel with random weights (biases and LN params randomized too)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(**{**TINY, **overrides})
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)  # default init leaves these at 0/1: make them matter
    return model


def prompt_logprobs(out) -> torch.Tensor:
    """The prompt tokens' log-probs of a ``RequestOutput`` asked for ``prompt_logprobs`` (positions 1 ..)."""
    return torch.tensor([entry[t] for entry, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])])


def make_adapter(base, directory, **lora_config):
    """A PEFT LoRA of the transformers model ``base`` with random A and B (PEFT starts B at zero, which would test
    nothing), saved to ``directory``; returns the PEFT model in float64, the reference."""
    import copy

    import peft

    config = peft.LoraConfig(init_lora_weights=False, fan_in_fan_out=True, **lora_config)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(directory)
    return model.double().eval()


def prompt_with_a_repeat_ahead(llm, n: int) -> list[int]:
    """A prompt after which ``llm``'s favourite next token would repeat one of its n-grams, found by trying: a
    random prompt whose first n tokens are replaced by its last n - 1 and the token the model likes best after
    it, which a long prompt's start seldom changes."""
    from engine import SamplingParams
    from engine.logits_processing import repeated_ngram_tokens

    greedy = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def favourite(ids: list[int]) -> int:
        return llm.generate(ids, greedy, use_tqdm=False)[0].outputs[0].token_ids[0]

    for _ in range(100):
        prompt = [random.randrange(50256) for _ in range(random.randint(24, 32))]
        prompt[:n] = prompt[len(prompt) - n + 1 :] + [favourite(prompt)]
        if favourite(prompt) in repeated_ngram_tokens(prompt, n):
            return prompt
    raise AssertionError(f"no prompt found whose favourite next token repeats a {n}-gram")


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy ``generate`` of ``n`` tokens after ``ids``, the reference for ours.

    The attention mask is explicit: without it, ``generate`` masks every prompt token equal to ``pad_token_id``
    (a random prompt holding token 0 would be attended differently than by us).
    """
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf_model.generate(x, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                                attention_mask=torch.ones_like(x))  # fmt: skip
    return out[0, len(ids) :].tolist()


def half_precision_errors(hf_model, llm, ids: list[int], dtype: torch.dtype) -> dict[str, tuple[float, float]]:
    """FlashAttention's criterion, measured: ``{"hidden" | "logits": (ours, transformers')}``, each the relative
    error against transformers' fp32 model, ours from ``llm`` (loaded in ``dtype``) and theirs from transformers
    itself run in ``dtype`` (on a copy: casting ``hf_model`` there and back would leave its weights rounded). Over whole
    ``[T, D]`` hidden states and ``[T, V]`` logits, so the ratio is stable."""
    import copy

    hidden = llm.features(ids)[0]
    logits = llm.model.logits(hidden).cpu()
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf_model(x, output_hidden_states=True)
        theirs = copy.deepcopy(hf_model).to(dtype)(x, output_hidden_states=True)
    ref_h, their_h = ref.hidden_states[-1][0], theirs.hidden_states[-1][0]
    ref_lg, their_lg = ref.logits[0].double(), theirs.logits[0].double()
    return {
        "hidden": (rel_err(hidden.cpu(), ref_h), rel_err(their_h, ref_h)),
        "logits": (rel_err(logits, ref_lg), rel_err(their_lg, ref_lg)),
    }


def save_checkpoint(model, directory, tokenizer_dir=None, published_layout=False):
    """Write ``model`` as a Hugging Face checkpoint; ``published_layout`` mimics openai-community's files."""
    import shutil

    from safetensors.torch import save_file

    model.save_pretrained(directory, safe_serialization=True)
    if published_layout:
        # openai-community/gpt2*: no "transformer." prefix, no lm_head, attention-mask buffers stored.
        sd = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()}
        sd.pop("lm_head.weight", None)
        n_pos = model.config.n_positions
        for i in range(model.config.n_layer):
            sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.uint8)).view(1, 1, n_pos, n_pos)
            sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory


_seq_ids = itertools.count()


def make_sequence(token_ids: list[int], max_tokens: int = 16, n: int = 1, request_id: str = "r"):
    """A request's first sequence (for block-manager and scheduler tests, no model); samples 1..n-1 wait to fork."""
    from engine.sampling_params import SamplingParams
    from engine.sequence import Request, Sequence, SequenceStatus

    request = Request(request_id, None, list(token_ids), SamplingParams(max_tokens=max_tokens, n=n), detokenize=False)
    for j in range(n):
        status = SequenceStatus.WAITING if j == 0 else SequenceStatus.FORK_PENDING
        request.seqs.append(Sequence(next(_seq_ids), request, j, status=status))
    return request.seqs[0]


def assert_blocks_consistent(blocks, seqs) -> None:
    """The block manager's invariants, given every sequence that holds blocks: each block is either free
    (reference count 0, in the free queue) or held, its count equal to the tables that list it; no table lists a
    block twice; every registered hash points at a block that carries it."""
    from collections import Counter

    users = Counter(b for seq in seqs for b in seq.block_table)
    for seq in seqs:
        assert len(set(seq.block_table)) == len(seq.block_table), f"sequence {seq.seq_id} lists a block twice"
    for block in blocks.blocks:
        assert block.ref_count == users[block.block_id], (block.block_id, block.ref_count, users[block.block_id])
        assert (block.block_id in blocks.free_queue) == (block.ref_count == 0), block.block_id
    assert len(blocks.free_queue) == blocks.num_blocks - len(users)
    for h, block_id in blocks.cached.items():
        assert blocks.blocks[block_id].hash == h


def assert_same_completions(got, want, rel: float = 1e-5) -> None:
    """Tokens, text, finish and stop reasons equal; log-probs within ``rel`` (fp32 noise: 1e-5 on the torch
    backend, 1e-4 on Triton's); the top-k sets may differ only between near-equal entries."""
    assert len(got.outputs) == len(want.outputs)
    for a, b in zip(got.outputs, want.outputs):
        assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == (b.token_ids, b.text, b.finish_reason,
                                                                          b.stop_reason)  # fmt: skip
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, rel=rel, abs=10 * rel)
        assert_same_logprobs(a.logprobs, b.logprobs, rel)
    assert_same_logprobs(got.prompt_logprobs, want.prompt_logprobs, rel)


def assert_same_logprobs(got: list[dict | None] | None, want: list[dict | None] | None, rel: float) -> None:
    """Per-token logprob dicts (``None`` entries and lists alike) within ``rel``; the top-k sets may differ only
    between near-equal entries."""
    assert (got is None) == (want is None)
    assert len(got or ()) == len(want or ())
    for da, db in zip(got or (), want or ()):
        assert (da is None) == (db is None)
        assert sorted((da or {}).values()) == pytest.approx(sorted((db or {}).values()), rel=rel, abs=rel)
        for token in set(da or ()) ^ set(db or ()):  # a swap at the k-th place is a near tie
            value = da.get(token, db.get(token))
            assert min(abs(value - v) for v in (*da.values(), *db.values()) if v != value) < 10 * rel


def assert_engine_empty(eng) -> None:
    """No request left in an ``LLMEngine``, every block free with reference count 0."""
    assert not eng.scheduler.running and not eng.scheduler.waiting and not eng.requests
    assert_blocks_consistent(eng.blocks, [])
    assert eng.blocks.num_free == eng.blocks.num_blocks and eng.get_stats().kv_cache_usage == 0.0


@dataclass
class History:
    """What the sampler reads of a sequence (``engine.logits_processing.TokenHistory``)."""

    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)


def reference_processed(logits, params, histories, eos) -> torch.Tensor:
    """The processed logits per row in float64, from the definitions: bias added; EOS (unless ignored) and stop
    tokens -inf while the output is shorter than min_tokens; CTRL's repetition penalty on prompt + output tokens;
    then frequency * count + presence * (count > 0), count over the output only."""
    out = logits.double().clone()
    for row, p, h in zip(out, params, histories):
        for t, b in (p.logit_bias or {}).items():
            row[t] += b
        if len(h.output_token_ids) < p.min_tokens:
            for t in (p.stop_token_ids or []) + ([] if p.ignore_eos else [eos]):
                row[t] = float("-inf")
        for t in set(h.prompt_token_ids) | set(h.output_token_ids):
            row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
        for t in set(h.output_token_ids):
            row[t] -= p.frequency_penalty * h.output_token_ids.count(t) + p.presence_penalty
    return out


# ---------------------------------------------------------------------------------------------- speculation
EOS = 50256
# a model the interpreter runs in seconds, yet with GPT-2's head dim (64) and a vocabulary that is not a power of two
SMALL = dict(n_embd=128, n_head=2, n_layer=2, vocab_size=1000, n_positions=64)


def random_ids(n: int, vocab: int = 50257) -> list[int]:
    """``n`` token ids drawn uniformly from ``[0, vocab)``."""
    return torch.randint(0, vocab, (n,)).tolist()


def random_prompts(count: int) -> list[list[int]]:
    """Prompts with a repeat inside, so that lookups hit from the first step."""
    prompts = []
    for _ in range(count):
        head = [random.randrange(EOS) for _ in range(random.randint(2, 12))]
        prompts.append(head + [random.randrange(EOS) for _ in range(random.randint(0, 6))] + head[:2])
    return prompts


def extended_latest_first(prompts: list[list[int]], outputs) -> list[list[int]]:
    """Each prompt followed by part of its output, the request that finished last first: its blocks are the ones a
    small pool still caches, so the first admission hits them before it evicts any."""
    order = sorted(range(len(prompts)), key=lambda i: -outputs[i].metrics.finished_time)
    return [prompts[i] + outputs[i].outputs[0].token_ids[: random.randint(8, 32)] for i in order]


def greedy_params(plain, prompts: list[list[int]]) -> list:
    """Greedy, random lengths, and for some prompts a stop token or stop string that the plain output meets half
    way and not before (the speculating engine must stop at the same token, even inside an accepted run of drafts;
    an output that repeats one token has no such stop, and runs its full length); only the others may end at EOS (a
    random model may favour it from the first token)."""
    from engine import SamplingParams

    params = []
    for prompt in prompts:
        n = random.randint(8, 40)
        base = dict(max_tokens=n, temperature=0, logprobs=1, n=random.choice([1, 1, 2]))
        out = plain.generate([prompt], SamplingParams(**base, ignore_eos=True), use_tqdm=False)[0].outputs[0]
        choice = random.choice(["eos", "stop_token", "stop_string"])
        if choice != "eos":
            base.update(ignore_eos=True, **late_stop(plain.get_tokenizer(), out.token_ids, choice))
        params.append(SamplingParams(**base))
    return params


def late_stop(tokenizer, token_ids: list[int], kind: str) -> dict:
    """A stop token (or its text) first met in the second half of ``token_ids``, or no stop when there is none."""
    n = len(token_ids)
    for i in random.sample(range(n // 2, n), n - n // 2):
        token = token_ids[i]
        text = tokenizer.decode([token]).strip()
        if kind == "stop_token" and token not in token_ids[:i]:
            return {"stop_token_ids": [token]}
        if kind == "stop_string" and text and text not in tokenizer.decode(token_ids[:i]):
            return {"stop": [text]}
    return {}


def reference_probs(model, prompt: list[int], length: int, top_k: int, temperature: float) -> dict[tuple, float]:
    """Every continuation of ``length`` tokens and its probability under top-k sampling, in float64."""
    model = model.double()
    probs = {(): 1.0}
    for _ in range(length):
        grown = {}
        for seq, p in probs.items():
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(seq)])).logits[0, -1] / temperature
            top = logits.topk(top_k)
            for token, q in zip(top.indices.tolist(), top.values.softmax(-1).tolist()):
                grown[seq + (token,)] = p * q
        probs = grown
    model.float()
    return probs


def chi2_quantile(dof: int, tail: float) -> float:
    """The chi-square value exceeded with probability ``tail`` (Wilson-Hilferty, good to a few percent here)."""
    z = math.sqrt(2) * torch.erfinv(torch.tensor(1 - 2 * tail, dtype=torch.float64)).item()
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def assert_samples_follow(llm, prompt: list[int], target_model, draws: int = 3000) -> None:
    """Five tokens with top-k 2 at temperature 1.5, ``draws`` times: the outcomes' counts pass a chi-square test
    against ``target_model``'s float64 probabilities (fails by chance once in 10^4 runs; the rare outcomes are
    pooled, as the test needs about 5 expected per bin)."""
    from engine import SamplingParams

    length, top_k, temperature = 5, 2, 1.5
    params = SamplingParams(max_tokens=length, temperature=temperature, top_k=top_k, ignore_eos=True)
    counts: dict[tuple, int] = {}
    for out in llm.generate([prompt] * draws, params, use_tqdm=False):
        key = tuple(out.outputs[0].token_ids)
        counts[key] = counts.get(key, 0) + 1
    probs = reference_probs(target_model, prompt, length, top_k, temperature)
    assert set(counts) <= set(probs), "sampled a continuation outside the top-k sets"
    bins = [([key], p) for key, p in probs.items() if draws * p >= 5]
    rare = [key for key, p in probs.items() if draws * p < 5]
    if rare:
        bins.append((rare, sum(probs[key] for key in rare)))
    chi2 = sum((sum(counts.get(k, 0) for k in keys) - draws * p) ** 2 / (draws * p) for keys, p in bins)
    assert chi2 < chi2_quantile(len(bins) - 1, 1e-4), f"chi2={chi2:.1f} over {len(bins)} bins"
