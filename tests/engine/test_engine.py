"""Whole-model parity of the torch backend against transformers' GPT-2 and the in-project float64 reference."""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.reference import ReferenceGPT2
from tests.helpers import (
    assert_static_decode_matches_eager,
    hf_greedy,
    make_hf_model,
    random_ids,
    rel_err,
    save_checkpoint,
)

TEXT = "Hello, I'm a language model, and these are my   words:\n\tcafé, 1234 🙂 — don't stop."


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu", block_size=16, progress=False)


@pytest.mark.parametrize("layout", ["save_pretrained", "published"])
def test_features_match_transformers(hf_model, tiny_checkpoint, tiny_published_checkpoint, layout):
    path = tiny_checkpoint if layout == "save_pretrained" else tiny_published_checkpoint
    llm = LLM(str(path), backend="torch", dtype="float32", device="cpu", progress=False)
    prompts = [TEXT, random_ids(37), random_ids(1)]
    feats = llm.features(prompts)
    for prompt, f in zip(prompts, feats):
        ids = llm.get_tokenizer().encode(prompt) if isinstance(prompt, str) else prompt
        with torch.no_grad():
            ref = hf_model.transformer(torch.tensor([ids])).last_hidden_state[0]
        assert f.shape == ref.shape
        assert rel_err(f, ref) < 1e-5


def test_score_matches_transformers(llm, hf_model):
    ids = random_ids(random.randint(20, 100))
    out = llm.score([ids, TEXT])
    with torch.no_grad():
        logp = hf_model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    ref = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    assert out[0].token_ids == ids
    assert rel_err(torch.tensor(out[0].logprobs), ref) < 1e-5
    assert out[0].perplexity == pytest.approx(torch.exp(-ref.mean()).item(), rel=1e-5)
    assert len(out[1].logprobs) == len(llm.get_tokenizer().encode(TEXT)) - 1


@pytest.mark.parametrize("stride", ["random", 64, 127])
def test_score_sliding_window(llm, hf_model, stride):
    """Texts longer than the context: each token scored once, in the first window that reaches it."""
    if stride == "random":
        stride = 1 + random.randrange(40)
    n_ctx = llm.config.n_positions
    ids = random_ids(n_ctx + random.randint(40, 150))
    out = llm.score(ids, stride=stride)[0]
    ref, begin, scored = [], 0, 1
    while scored < len(ids):
        end = min(begin + n_ctx, len(ids))
        with torch.no_grad():
            logp = hf_model(torch.tensor([ids[begin:end]])).logits[0].double().log_softmax(-1)
        rows = logp[scored - 1 - begin : end - 1 - begin]
        ref.append(rows.gather(1, torch.tensor(ids[scored:end])[:, None]).squeeze(1))
        scored, begin = end, begin + stride
    ref = torch.cat(ref)
    assert len(out.logprobs) == len(ids) - 1
    assert rel_err(torch.tensor(out.logprobs), ref) < 1e-5


def test_greedy_matches_transformers(llm, hf_model):
    ids = random_ids(random.randint(3, 30))
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    out = llm.generate([ids, TEXT], params, use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf_model, ids, 32)
    text_ids = llm.get_tokenizer().encode(TEXT)
    assert out[1].prompt_token_ids == text_ids
    assert out[1].outputs[0].token_ids == hf_greedy(hf_model, text_ids, 32)
    assert out[1].outputs[0].text == llm.get_tokenizer().decode(out[1].outputs[0].token_ids)
    assert all(o.outputs[0].finish_reason == "length" for o in out)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_decode_matches_reference(tiny_checkpoint, block_size):
    """Decode over the paged cache gives the log-probs a float64 full recompute gives, token by token."""
    llm = LLM(str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu", block_size=block_size,
              progress=False)  # fmt: skip
    llm.kv.k.fill_(float("nan"))  # a slot read before it is written poisons the result
    llm.kv.v.fill_(float("nan"))
    ref = ReferenceGPT2(llm.config, _loaded_weights(tiny_checkpoint))
    ids = random_ids(random.randint(5, 40))
    out = llm.generate(ids, SamplingParams(max_tokens=24, temperature=0.8, seed=random.randrange(1 << 30),
                                           logprobs=3, ignore_eos=True), use_tqdm=False)[0].outputs[0]  # fmt: skip
    full = ids + out.token_ids
    _, logits = ref.forward(full[:-1])
    logp = logits.log_softmax(-1)[len(ids) - 1 :]
    want = logp.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
    got = torch.tensor([entry[t] for entry, t in zip(out.logprobs, out.token_ids)], dtype=torch.float64)
    assert rel_err(got, want) < 1e-5
    assert out.cumulative_logprob == pytest.approx(want.sum().item(), rel=1e-5)
    top3 = logp.topk(3).indices.tolist()
    for entry, tok, best in zip(out.logprobs, out.token_ids, top3):
        assert set(entry) == set(best) | {tok}


def _loaded_weights(path):
    from engine.loader import load_checkpoint

    return load_checkpoint(path, torch.float32, torch.device("cpu"), progress=False)[1]


def test_ragged_batch_equals_each_alone(llm):
    prompts = [random_ids(n) for n in random.sample(range(1, 60), 5)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    batch = llm.generate(prompts, params, use_tqdm=False)
    for prompt, together in zip(prompts, batch):
        alone = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        assert together.outputs[0].token_ids == alone.token_ids
        a = torch.tensor([d[t] for d, t in zip(together.outputs[0].logprobs, alone.token_ids)])
        b = torch.tensor([d[t] for d, t in zip(alone.logprobs, alone.token_ids)])
        assert rel_err(a, b) < 1e-5


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    seed = random.randrange(1 << 30)
    prompt = random_ids(9)
    params = SamplingParams(max_tokens=16, temperature=1.0, top_k=50, top_p=0.9, seed=seed, ignore_eos=True, n=2)
    alone = llm.generate(prompt, params, use_tqdm=False)[0]
    others = [random_ids(n) for n in (3, 17)]
    unseeded = SamplingParams(max_tokens=20, ignore_eos=True)
    mixed = llm.generate([others[0], prompt, others[1]], [unseeded, params, unseeded], use_tqdm=False)[1]
    assert [c.token_ids for c in mixed.outputs] == [c.token_ids for c in alone.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids  # the n samples differ
    different = llm.generate(prompt, SamplingParams(max_tokens=16, seed=seed + 1, ignore_eos=True), use_tqdm=False)
    assert different[0].outputs[0].token_ids != alone.outputs[0].token_ids


def test_stop_conditions(llm):
    ids = random_ids(6)
    free = llm.generate(ids, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), use_tqdm=False)
    tokens = free[0].outputs[0].token_ids
    # a stop token: generation ends on it, it is the last token, its text is left out
    k = random.randrange(1, 10)
    out = llm.generate(ids, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[tokens[k]]), use_tqdm=False)
    first = tokens.index(tokens[k])
    c = out[0].outputs[0]
    assert c.token_ids == tokens[: first + 1] and c.finish_reason == "stop" and c.stop_reason == tokens[k]
    assert c.text == llm.get_tokenizer().decode(tokens[:first])
    # a stop string: the text is cut before it
    text = llm.get_tokenizer().decode(tokens)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    c = llm.generate(ids, SamplingParams(max_tokens=20, temperature=0, stop=stop), use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == text[: text.find(stop)]
    # EOS (config.eos_token_id) ends generation unless ignore_eos
    eos_llm = LLM(str(llm.model_path), backend="torch", dtype="float32", device="cpu", progress=False)
    eos_llm.llm_engine.output_processor.eos_token_id = tokens[k]
    c = eos_llm.generate(ids, SamplingParams(max_tokens=20, temperature=0), use_tqdm=False)[0].outputs[0]
    assert c.token_ids == tokens[: first + 1] and c.finish_reason == "stop" and c.stop_reason is None
    c = eos_llm.generate(ids, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), use_tqdm=False)
    assert c[0].outputs[0].token_ids == tokens


def test_stream_matches_generate(llm):
    ids = random_ids(7)
    params = SamplingParams(max_tokens=25, temperature=0, ignore_eos=True)
    full = llm.generate(ids, params, use_tqdm=False)[0].outputs[0]
    deltas = list(llm.generate_stream(ids, params))
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])
    # an abandoned stream frees its blocks
    stream = llm.generate_stream(ids, params)
    next(stream)
    stream.close()
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_more_sequences_than_fit_at_once(tiny_checkpoint):
    """More requests than the pool holds at once: they queue and all complete (continuous admission)."""
    llm = LLM(str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu", block_size=4, num_blocks=12,
              max_num_seqs=3, progress=False)  # fmt: skip
    prompts = [random_ids(random.randint(1, 10)) for _ in range(7)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    out = llm.generate(prompts, params, use_tqdm=False)
    for prompt, o in zip(prompts, out):
        assert o.outputs[0].token_ids == llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.blocks.num_free == 12


def test_fixed_shape_decode_matches_eager(tiny_checkpoint):
    """The padded fixed-size buckets that CUDA graphs replay give eager decode's results (run eagerly here):
    14 requests through a 7-sequence batch (buckets 1, 2, 4, 8), whose block tables are as wide as
    ``max_model_len`` needs (the longest request fills it), not the model's 128 positions."""
    prompts = [random_ids(random.randint(1, 20)) for _ in range(14)]
    max_model_len = max(map(len, prompts)) + 16

    def make(max_num_seqs):
        return LLM(str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu", block_size=4,
                   max_num_seqs=max_num_seqs, max_model_len=max_model_len, progress=False)  # fmt: skip

    decoder = assert_static_decode_matches_eager(make, 7, prompts, 16)
    assert decoder.sizes == [1, 2, 4, 8] and decoder.max_blocks == -(-max_model_len // 4)


@pytest.fixture(scope="module")
def gpt2_init_checkpoint(tmp_path_factory):
    """GPT-2's own init scale (0.02): the large-init test model amplifies any weight noise chaotically."""
    model = make_hf_model(initializer_range=0.02, n_embd=128, n_head=2)  # K = 128: int4 groups of 128, as GPT-2's
    return save_checkpoint(model, tmp_path_factory.mktemp("gpt2-init"))


@pytest.mark.parametrize("quantization, min_db", [("int8", 30.0), ("int4", 20.0)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_backend_quantized_logits_sqnr(gpt2_init_checkpoint, quantization, min_db, dtype):
    """Weight-only int8 / int4 on the torch backend (PyTorch's CPU GEMMs) keeps the logits close to unquantized,
    as the triton backend's do (test_triton_model)."""
    ids = random_ids(random.randint(5, 40))
    base = LLM(str(gpt2_init_checkpoint), backend="torch", dtype=dtype, device="cpu", progress=False)
    quant = LLM(str(gpt2_init_checkpoint), backend="torch", dtype=dtype, device="cpu", progress=False,
                quantization=quantization)  # fmt: skip
    ref, got = (m.model.logits(m.features(ids)[0]).double() for m in (base, quant))
    db = 10 * torch.log10(ref.pow(2).sum() / (got - ref).pow(2).sum()).item()
    print(f"{quantization} {dtype}: logits SQNR {db:.1f} dB")
    assert db >= min_db
    assert not torch.equal(got, ref)  # the weights really were quantized


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_torch_backend_lm_head_precision(gpt2_init_checkpoint, quantization):
    """The head stays in fp32 unquantized; under weight quantization on CPU it reads fp16 weights (half the bytes),
    its logits those of the fp16-rounded head, in fp32 accumulation."""
    llm = LLM(str(gpt2_init_checkpoint), backend="torch", device="cpu", progress=False, quantization=quantization)
    hidden = llm.features(random_ids(random.randint(5, 40)))[0]
    head = llm.model.w.head
    if quantization is not None and "fbgemm" in torch.backends.quantized.supported_engines:
        head = head.half()
    ref = hidden.double() @ head.double().T
    got = llm.model.logits(hidden)
    assert got.dtype == torch.float32
    assert rel_err(got, ref) < 1e-5
    if head.dtype == torch.float16:  # and the fp32 head would have been measurably different
        assert rel_err(hidden.double() @ llm.model.w.head.double().T, ref) > 1e-5


def test_torch_backend_never_imports_the_kernels(tiny_checkpoint):
    """The torch backend (quantized too) runs without Triton's kernels: nothing under kernels/ is imported."""
    import subprocess
    import sys

    code = (
        "import sys; from engine import LLM, SamplingParams\n"
        f"llm = LLM({str(tiny_checkpoint)!r}, backend='torch', device='cpu', quantization='int8', progress=False)\n"
        "llm.generate([1, 2, 3], SamplingParams(max_tokens=2), use_tqdm=False)\n"
        "print(sorted(m for m in sys.modules if m == 'kernels' or m.startswith('kernels.')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
