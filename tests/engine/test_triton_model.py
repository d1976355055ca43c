"""The whole GPT-2 forward through the Triton kernels (``backend="triton"``), against transformers.

On a CPU-only machine the kernels run in Triton's interpreter, so the model is small (but head dim 64, as in
every GPT-2 size, and a vocabulary that is not a power of two).
"""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, BeamSearchParams, SamplingParams
from tests.helpers import (
    DEVICE,
    SMALL,
    assert_engine_empty,
    assert_same_completions,
    assert_static_decode_matches_eager,
    hf_greedy,
    make_hf_model,
    random_ids,
    rel_err,
    save_checkpoint,
)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    model = make_hf_model(**SMALL)
    return model, save_checkpoint(model, tmp_path_factory.mktemp("small-gpt2"))


@pytest.fixture(scope="module")
def gpt2_init_model(tmp_path_factory):
    """GPT-2's own init scale (0.02): the large-init test model amplifies any weight noise chaotically."""
    model = make_hf_model(**SMALL, initializer_range=0.02)
    return model, save_checkpoint(model, tmp_path_factory.mktemp("small-gpt2-init"))


def triton_llm(path, dtype="float32", **kw) -> LLM:
    return LLM(str(path), backend="triton", dtype=dtype, device=DEVICE, block_size=16, progress=False, **kw)


def prompts(k: int) -> list[list[int]]:
    return [torch.randint(0, SMALL["vocab_size"], (random.randint(1, 40),)).tolist() for _ in range(k)]


def hf_logits(model, ids: list[int], dtype=torch.float32) -> torch.Tensor:
    m = model.to(dtype)
    with torch.no_grad():
        out = m(torch.tensor([ids])).logits[0].double()
    model.float()
    return out


def test_triton_fp32_matches_transformers(small_model):
    model, path = small_model
    llm = triton_llm(path)
    assert llm.backend == "triton"
    batch = prompts(3)
    for ids, feats, scored in zip(batch, llm.features(batch), llm.score([p + [7] for p in batch])):
        with torch.no_grad():
            ref_h = model.transformer(torch.tensor([ids])).last_hidden_state[0]
        assert rel_err(feats.cpu(), ref_h) < 1e-4
        logp = hf_logits(model, ids + [7]).log_softmax(-1)
        ref_lp = logp[:-1].gather(1, torch.tensor(ids[1:] + [7])[:, None]).squeeze(1)
        assert rel_err(torch.tensor(scored.logprobs), ref_lp) < 1e-4
    # greedy decode over the paged cache, ragged batch, equals transformers' greedy generate
    llm.kv.k.fill_(float("nan"))  # a slot read before it is written poisons the result
    llm.kv.v.fill_(float("nan"))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for ids, out in zip(batch, llm.generate(batch, params, use_tqdm=False)):
        assert out.outputs[0].token_ids == hf_greedy(model, ids, 12)


def test_triton_beam_search_matches_transformers(small_model):
    """Each step a decode batch whose beams share blocks (forked from their parents' requests): the paged decode
    kernel reads them, the KV store writes each new token after the copies on write; on a GPU, as CUDA graphs."""
    model, path = small_model
    width, n = random.randint(2, 4), random.randint(4, 8)
    batch = prompts(2)
    outputs = triton_llm(path).beam_search(batch, BeamSearchParams(width, n, ignore_eos=True), use_tqdm=False)
    for ids, out in zip(batch, outputs):
        x = torch.tensor([ids])
        with torch.no_grad():
            want = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, num_beams=width,
                                  num_return_sequences=width, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)  # fmt: skip
        assert [seq.tokens for seq in out.sequences] == want.tolist()


@pytest.mark.parametrize("drafter", ["ngram", "draft_model"])
def test_triton_speculative_decoding_matches_transformers(gpt2_init_model, drafter):
    """Drafts checked as decode rows over the paged cache, mixed with plain decode steps (CUDA graphs on a GPU) when
    no lookup hits: transformers' greedy tokens. With a draft model (here the target itself), its catch-up chunks
    run the context-attention kernel over its own cache, and its drafts land."""
    model, path = gpt2_init_model
    config = {"num_speculative_tokens": 4, **({"model": str(path)} if drafter == "draft_model" else {})}
    llm = triton_llm(path, speculative_config=config)
    batch = [p[:32] + p[:3] for p in prompts(3)]  # a repeat ahead: the first lookups hit (and 35 + 24 < 64)
    n = random.randint(16, 24)
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    for ids, out in zip(batch, llm.generate(batch, params, use_tqdm=False)):
        assert out.outputs[0].token_ids == hf_greedy(model, ids, n)
    assert llm.llm_engine.get_stats().spec_decode_num_accepted_tokens > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_error_within_2x_of_transformers(small_model, dtype):
    """FlashAttention's criterion: our error vs the fp32 model is at most ~2x transformers' own in ``dtype``.

    Compared over whole ``[T, D]`` hidden states and ``[T, V]`` logits of a near-full context, so the ratio
    of the two errors is stable from run to run.
    """
    model, path = small_model
    llm = triton_llm(path, dtype=str(dtype).removeprefix("torch."))
    ids = torch.randint(0, SMALL["vocab_size"], (random.randint(48, SMALL["n_positions"]),)).tolist()
    hidden = llm.features(ids)[0]
    logits = llm.model.logits(hidden).cpu()
    ref_logits, their_logits = hf_logits(model, ids), hf_logits(model, ids, dtype)
    with torch.no_grad():
        ref_h = model.transformer(torch.tensor([ids])).last_hidden_state[0]
        their_h = model.to(dtype).transformer(torch.tensor([ids])).last_hidden_state[0]
    model.float()
    ours, theirs = rel_err(hidden.cpu(), ref_h), rel_err(their_h, ref_h)
    ours_lg, theirs_lg = rel_err(logits, ref_logits), rel_err(their_logits, ref_logits)
    print(f"{dtype}: hidden {ours:.2e} vs transformers {theirs:.2e}; logits {ours_lg:.2e} vs {theirs_lg:.2e}")
    assert theirs > 0  # the comparison means something: half precision does lose bits
    assert ours <= 2 * theirs
    assert ours_lg <= 2 * theirs_lg


def sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return 10 * torch.log10(ref.pow(2).sum() / (x.double() - ref).pow(2).sum()).item()


@pytest.mark.parametrize("quantization, min_db", [("int8", 30.0), ("int4", 20.0)])
def test_quantized_model_sqnr(gpt2_init_model, quantization, min_db):
    """Weight-only quantization keeps the logits close to the unquantized model's (SQNR in dB)."""
    _, path = gpt2_init_model
    ids = prompts(1)[0] + [5]
    base = triton_llm(path, dtype="float16")
    quant = triton_llm(path, dtype="float16", quantization=quantization)
    h_base, h_quant = base.features(ids)[0], quant.features(ids)[0]
    logits_base, logits_quant = base.model.logits(h_base), quant.model.logits(h_quant)
    db = sqnr_db(logits_quant, logits_base)
    print(f"{quantization}: logits SQNR {db:.1f} dB")
    assert db >= min_db


def test_triton_fixed_shape_decode_matches_eager(small_model):
    """The padded buckets that a GPU replays as CUDA graphs (run eagerly here) through the Triton kernels: pad
    rows store nothing (slot -1) and attend over nothing (context 0), and the paged decode launches are sized for
    the whole context whatever the step."""
    _, path = small_model
    decoder = assert_static_decode_matches_eager(lambda n: triton_llm(path, max_num_seqs=n), 3, prompts(4), 8)
    assert decoder.sizes == [1, 2, 4]


@pytest.fixture(scope="module")
def narrow_model(tmp_path_factory):
    """SMALL with a 256-token vocabulary: the LM head is most of an interpreted step, and the stress test runs many."""
    return save_checkpoint(make_hf_model(**{**SMALL, "vocab_size": 256}), tmp_path_factory.mktemp("narrow-gpt2"))


def test_triton_engine_under_pressure_matches_requests_alone(narrow_model):
    """The serving engine on the Triton kernels, smaller than the torch backend's stress run (each interpreted step
    costs about a second): preemption, chunked prefill (mixed steps through context_attention and paged decode),
    prefix hits and n > 1 change no request's tokens or log-probs against the same request alone."""
    block, vocab = 8, 256
    requests = []
    for i in range(6):
        greedy = random.random() < 0.5
        params = SamplingParams(n=1 if greedy else random.randint(1, 2), max_tokens=random.randint(1, 4),
                                temperature=0.0 if greedy else 1.0, seed=random.randrange(1 << 30),
                                ignore_eos=True, logprobs=random.choice([None, 2]))  # fmt: skip
        prompt = torch.randint(0, vocab, (random.randint(1, 24),)).tolist()
        if i < 3:  # 3 x 6 blocks: more than the pool (at most 2 x 4 + 2 blocks), so preemption is certain
            prompt = torch.randint(0, vocab, (random.randint(38, 40),)).tolist()
            params.n, params.max_tokens = 1, 4
        elif i == 5:  # shares two blocks of a prompt with an earlier request
            prompt = requests[random.randrange(i)][1][: 2 * block] + prompt[:8]
        requests.append((f"r{i}", prompt, params))
    largest = max(-(-(len(p) + sp.max_tokens - 1) // block) * sp.n for _, p, sp in requests)
    engine = LLM(str(narrow_model), backend="triton", dtype="float32", device=DEVICE, block_size=block,
                 progress=False, num_blocks=largest + 2, max_num_seqs=4,
                 max_num_batched_tokens=16).llm_engine  # fmt: skip
    engine.kv.k.fill_(float("nan"))  # a slot read before it is written poisons the result
    engine.kv.v.fill_(float("nan"))
    for request in requests:
        engine.add_request(*request)
    final = {}
    while engine.has_unfinished_requests():
        final.update((out.request_id, out) for out in engine.step() if out.finished)
    assert engine.get_stats().num_preemptions > 0
    assert_engine_empty(engine)
    reference = LLM(str(narrow_model), backend="triton", dtype="float32", device=DEVICE, block_size=block,
                    progress=False, enable_prefix_caching=False)  # fmt: skip
    for request_id, prompt, params in requests:
        assert_same_completions(final[request_id], reference.generate(prompt, params, use_tqdm=False)[0], rel=1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="sizes a GPU's pool (on CPU the argument is refused: test_api)")
def test_gpu_memory_utilization_bounds_the_pool(small_model):
    """vLLM's rule: the pool fits in that fraction of the GPU less what is in use; a fraction smaller than what the
    weights already take is refused by name."""
    from engine.kv_cache import KVCache

    _, path = small_model
    total = torch.cuda.mem_get_info()[1]
    fraction = random.uniform(0.5, 0.9)
    llm = triton_llm(path, gpu_memory_utilization=fraction)  # a small pool: the device tests share the GPU
    per_block = KVCache.bytes_per_block(llm.config, 16, llm.dtype)
    assert 0 < llm.blocks.num_blocks * per_block <= fraction * total
    with pytest.raises(ValueError, match="gpu_memory_utilization=1e-09 leaves nothing"):
        triton_llm(path, gpu_memory_utilization=1e-9)


@pytest.mark.skipif(DEVICE != "cuda", reason="reads CUDA's allocator (the profile's step on CPU: test_kv_budget)")
def test_the_profiled_peak_covers_the_largest_real_step(tmp_path):
    """What ``gpu_memory_utilization`` leaves beside the pool is at least what the engine's largest step holds at
    once: ``max_num_batched_tokens`` prompt tokens, every row's prompt logprobs, over GPT-2's whole vocabulary."""
    from engine.kv_budget import TUNING_BUFFER_BYTES, step_peak_bytes
    from engine.sampling_params import MAX_LOGPROBS

    path = save_checkpoint(make_hf_model(**{**SMALL, "vocab_size": 50257, "n_positions": 512}), tmp_path)
    llm = triton_llm(path, "float16", max_num_seqs=4, max_num_batched_tokens=1024, gpu_memory_utilization=0.5)
    engine = llm.llm_engine
    args = engine.model, engine.max_num_batched_tokens, engine.max_num_seqs, engine.max_model_len
    reserved = step_peak_bytes(*args) - TUNING_BUFFER_BYTES  # the step's own part (its logits, 2 x 206 MB, lead)
    prompts = [random_ids(256) for _ in range(4)]  # one step of 1024 tokens
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9, logprobs=5, prompt_logprobs=MAX_LOGPROBS)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    outs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated() - before
    assert [len(out.prompt_logprobs) for out in outs] == [256] * 4
    assert engine.get_stats().num_preemptions == 0
    assert 0 < used <= reserved, (used, reserved)
