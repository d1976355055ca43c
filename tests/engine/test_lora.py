"""LoRA adapters: our logits under an adapter are PEFT's (the independent reference, run in float64), several adapters
and the base model share a batch, ``max_loras`` bounds the adapters of a step without losing a request, the prefix
cache never serves one adapter's K/V to another, and every adapter that cannot be served is refused by name."""

from __future__ import annotations

import copy
import json
import random

import peft
import pytest
import torch

from engine import LLM, BeamSearchParams, LLMEngine, LoRARequest, SamplingParams
from engine.cuda_graphs import StaticDecoder
from engine.weights import LINEAR_FIELDS
from tests.helpers import hf_greedy, make_adapter, make_hf_model, prompt_logprobs, rel_err, save_checkpoint

ENGINE = dict(backend="torch", dtype="float32", device="cpu", block_size=4, progress=False)
ALL = ["c_attn", "c_proj", "c_fc"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base checkpoint and three adapters: every linear at rank 4; c_attn and mlp.c_proj only at rank 8
    with per-module alpha; rsLoRA with a per-module rank."""
    base = make_hf_model()
    root = tmp_path_factory.mktemp("lora")
    save_checkpoint(base, root / "base")
    some = dict(r=8, lora_alpha=16, target_modules=["c_attn", "mlp.c_proj"], alpha_pattern={"c_attn": 4})
    rs = dict(r=2, lora_alpha=4, target_modules=ALL, use_rslora=True, rank_pattern={"c_fc": 6})
    refs = {
        "all": make_adapter(base, root / "all", r=4, lora_alpha=8, target_modules=ALL),
        "some": make_adapter(base, root / "some", **some),
        "rs": make_adapter(base, root / "rs", **rs),
    }
    requests = {name: LoRARequest(name, i + 1, str(root / name)) for i, name in enumerate(refs)}
    return root, base.double(), refs, requests


def reference_logprobs(model, ids: list[int], adapter: bool) -> torch.Tensor:
    """``[T, V]`` float64 log-probabilities of the PEFT model, with or without its adapter."""
    x = torch.tensor([ids])
    with torch.no_grad():
        if adapter:
            return model(x).logits[0].log_softmax(-1)
        with model.disable_adapter():
            return model(x).logits[0].log_softmax(-1)


def random_prompt(n: int) -> list[int]:
    return [random.randrange(50256) for _ in range(n)]


@pytest.mark.parametrize("name", ["all", "some", "rs"])
def test_logprobs_under_an_adapter_are_peft_s(setup, name):
    root, _, refs, requests = setup
    llm = LLM(root / "base", enable_lora=True, max_lora_rank=8, **ENGINE)
    ids = random_prompt(random.randint(9, 20))
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    out = llm.generate(ids, params, use_tqdm=False, lora_request=requests[name])[0]
    want = reference_logprobs(refs[name], ids, adapter=True)
    target = torch.tensor(ids[1:])
    want = want[:-1].gather(1, target[:, None]).squeeze(1)
    assert rel_err(prompt_logprobs(out), want) < 1e-5
    base_want = reference_logprobs(refs[name], ids, adapter=False)[:-1].gather(1, target[:, None]).squeeze(1)
    assert rel_err(want, base_want) > 1e-2, "the adapter barely changes the model: the test could not fail"


def test_an_adapter_over_int8_weights(setup):
    """LoRA composes with weight-only int8: the adapter's update, unquantized, joins the int8 GEMM's epilogue. The
    reference is PEFT's float64 model over the very weights our int8 ones dequantize to."""
    root, base, _, requests = setup
    llm = LLM(root / "base", enable_lora=True, max_lora_rank=8, quantization="int8", **ENGINE)
    dequantized = copy.deepcopy(base)
    with torch.no_grad():
        for ours, block in zip(llm.model.w.layers, dequantized.transformer.h):
            convs = (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
            for field, conv in zip(LINEAR_FIELDS, convs):
                conv.weight.copy_(getattr(ours, field).dequantize(torch.float64).t())  # Conv1D is [in, out]
    reference = peft.PeftModel.from_pretrained(dequantized, requests["all"].lora_path).double().eval()
    ids = random_prompt(20)
    target = torch.tensor(ids[1:])[:, None]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    for request in (None, requests["all"]):
        got = prompt_logprobs(llm.generate(ids, params, use_tqdm=False, lora_request=request)[0])
        want = reference_logprobs(reference, ids, adapter=request is not None)[:-1].gather(1, target).squeeze(1)
        assert rel_err(got, want) < 1e-4, request  # the int8 GEMM's fp32 rounding over 8 GEMMs (1e-5 each)


@pytest.mark.parametrize("budget", [None, 8])
def test_adapters_and_the_base_model_share_a_batch(setup, budget):
    """Three adapters and the base model in one generate call, greedy: each prompt continues as PEFT's model does
    with its own adapter (prefill, then decode steps mixing all four; with a budget of 8 tokens a step, prompt
    chunks over cached context beside decodes)."""
    root, base, refs, requests = setup
    llm = LLM(root / "base", enable_lora=True, max_loras=3, max_lora_rank=8, max_num_seqs=8,
              max_num_batched_tokens=budget, **ENGINE)  # fmt: skip
    names = ["all", None, "some", "rs", "all", None]
    prompts = [random_prompt(random.randint(3, 12)) for _ in names]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=[requests.get(n) for n in names])
    for name, ids, out in zip(names, prompts, outs):
        model = base if name is None else refs[name]
        assert out.outputs[0].token_ids == hf_greedy(model, ids, 8), name


def test_a_random_adapter_is_one_peft_reads(setup, tmp_path):
    """``save_random_adapter`` (benchmarks' and tests' adapters without peft) writes what PEFT loads, with the same
    logits as ours under it."""
    from engine.lora import save_random_adapter

    root, base, _, _ = setup
    llm = LLM(root / "base", enable_lora=True, max_lora_rank=8, **ENGINE)
    path = save_random_adapter(tmp_path / "random", llm.config, rank=8, std=0.2)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base).float(), str(path)).double().eval()
    ids = random_prompt(15)
    target = torch.tensor(ids[1:])[:, None]
    out = llm.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False,
                       lora_request=LoRARequest("random", 5, str(path)))[0]  # fmt: skip
    want = reference_logprobs(reference, ids, adapter=True)[:-1].gather(1, target).squeeze(1)
    assert rel_err(prompt_logprobs(out), want) < 1e-5
    assert rel_err(want, reference_logprobs(reference, ids, adapter=False)[:-1].gather(1, target).squeeze(1)) > 1e-2


def test_max_loras_bounds_each_step_and_loses_nobody(setup):
    """One slot for three adapters: the scheduler runs one adapter at a time (and the base model beside it), and
    every request finishes as it would alone; adapters are read again from disk after leaving the host cache."""
    root, _, _, requests = setup
    llm = LLM(root / "base", enable_lora=True, max_loras=1, max_lora_rank=8, max_cpu_loras=1, **ENGINE)
    seen = []
    activate = llm.runner.loras.activate
    llm.runner.loras.activate = lambda wanted: seen.append({r.lora_int_id for r in wanted}) or activate(wanted)
    names = [random.choice(["all", "some", "rs", None]) for _ in range(10)]
    prompts = [random_prompt(random.randint(3, 10)) for _ in names]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0)
    together = llm.generate(prompts, params, use_tqdm=False, lora_request=[requests.get(n) for n in names])
    assert seen and all(len(ids) <= 1 for ids in seen)
    assert len({frozenset(ids) for ids in seen if ids}) == len({n for n in names if n}), "an adapter never ran"
    fresh = LLM(root / "base", enable_lora=True, max_loras=3, max_lora_rank=8, **ENGINE)
    for name, ids, got in zip(names, prompts, together):
        alone = fresh.generate(ids, params, use_tqdm=False, lora_request=requests.get(name))[0]
        assert got.outputs[0].token_ids == alone.outputs[0].token_ids
        got_lp = torch.tensor([d[t] for d, t in zip(got.outputs[0].logprobs, got.outputs[0].token_ids)])
        want_lp = torch.tensor([d[t] for d, t in zip(alone.outputs[0].logprobs, alone.outputs[0].token_ids)])
        assert rel_err(got_lp, want_lp) < 1e-5


def test_the_prefix_cache_keeps_each_adapter_s_blocks_its_own(setup):
    root, base, refs, requests = setup
    llm = LLM(root / "base", enable_lora=True, max_loras=2, max_lora_rank=8, **ENGINE)
    ids = random_prompt(17)  # four full blocks of 4
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    target = torch.tensor(ids[1:])[:, None]
    for lora in (None, requests["all"], requests["some"], requests["all"], None):
        out = llm.generate(ids, params, use_tqdm=False, lora_request=lora)[0]
        model = refs["all"] if lora is None else refs[lora.lora_name]
        want = reference_logprobs(model, ids, adapter=lora is not None)[:-1].gather(1, target).squeeze(1)
        assert rel_err(prompt_logprobs(out), want) < 1e-5
    # prompt logprobs need every row computed, so they bypass the cache: ask again without them, greedy
    plain = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    same_files = LoRARequest("rs2", 9, requests["rs"].lora_path)  # another id: another adapter to the cache
    cached = []
    for lora in (requests["rs"], requests["rs"], None, same_files):
        out = llm.generate(ids, plain, use_tqdm=False, lora_request=lora)[0]
        cached.append(out.num_cached_tokens)
        assert out.outputs[0].token_ids == hf_greedy(refs["rs"] if lora else base, ids, 4)
    assert cached == [0, 16, 16, 0]


def test_score_and_features_under_an_adapter_are_peft_s(setup):
    """Against PEFT's float64 model. The final hidden states come out of ln_f, which divides a row's rounding error
    by its spread: where that is small, fp32 itself errs past 1e-5 (8.7e-6 in 48 draws, 1.1e-5 in a CI run, PEFT's
    own fp32 model as much), so ours may err up to twice what PEFT's fp32 model does there (FlashAttention's rule)."""
    root, _, refs, requests = setup
    llm = LLM(root / "base", enable_lora=True, max_lora_rank=8, **ENGINE)
    ids = random_prompt(random.randint(10, 30))
    x = torch.tensor([ids])
    with torch.no_grad():
        out = refs["rs"](x, output_hidden_states=True)
        fp32_hidden = copy.deepcopy(refs["rs"]).float()(x, output_hidden_states=True).hidden_states[-1][0]
    want = out.logits[0, :-1].log_softmax(-1).gather(1, x[0, 1:, None]).squeeze(1)
    assert rel_err(torch.tensor(llm.score(ids, lora_request=requests["rs"])[0].logprobs), want) < 1e-5
    fp32_err = rel_err(fp32_hidden, out.hidden_states[-1][0])
    ours = rel_err(llm.features(ids, lora_request=requests["rs"])[0], out.hidden_states[-1][0])
    assert ours < max(1e-5, 2 * fp32_err), (ours, fp32_err)


def test_beam_search_under_an_adapter_finds_peft_s_beams(setup):
    root, _, refs, requests = setup
    llm = LLM(root / "base", enable_lora=True, max_lora_rank=8, **ENGINE)
    ids, params = random_prompt(7), BeamSearchParams(3, 5, ignore_eos=True)
    out = llm.beam_search(ids, params, use_tqdm=False, lora_request=requests["some"])[0]
    x = torch.tensor([ids])
    with torch.no_grad():
        want = refs["some"].generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=3, num_return_sequences=3,
            max_new_tokens=5, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    assert [s.tokens[len(ids) :] for s in out.sequences] == [row[len(ids) :].tolist() for row in want]


def test_speculative_decoding_keeps_an_adapter_s_greedy_output(setup):
    root, _, _, requests = setup
    spec = LLM(root / "base", enable_lora=True, max_loras=2, max_lora_rank=8,
               speculative_config={"num_speculative_tokens": 3, "prompt_lookup_max": 2}, **ENGINE)  # fmt: skip
    plain = LLM(root / "base", enable_lora=True, max_loras=2, max_lora_rank=8, **ENGINE)
    prompts = [random_prompt(6) * 3 for _ in range(3)]  # repeats, so drafts happen
    loras = [requests["all"], None, requests["rs"]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    got = spec.generate(prompts, params, use_tqdm=False, lora_request=loras)
    want = plain.generate(prompts, params, use_tqdm=False, lora_request=loras)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert spec.llm_engine.spec_draft_tokens > 0


def test_stats_name_the_running_and_waiting_adapters(setup):
    root, _, _, requests = setup
    engine = LLMEngine(root / "base", enable_lora=True, max_loras=1, max_lora_rank=8, **ENGINE)
    params = SamplingParams(max_tokens=3)
    for i, lora in enumerate([requests["rs"], None, requests["all"], requests["rs"]]):
        engine.add_request(str(i), random_prompt(5), params, lora_request=lora)
    engine.step()
    stats = engine.get_stats()
    assert (stats.running_lora_adapters, stats.waiting_lora_adapters, stats.max_lora) == (("rs",), ("all",), 1)
    while engine.has_unfinished_requests():
        engine.step()
    stats = engine.get_stats()
    assert stats.running_lora_adapters == stats.waiting_lora_adapters == ()
    assert LLMEngine(root / "base", **ENGINE).get_stats().max_lora == 0


def test_fixed_shape_decode_buckets_apply_each_row_s_adapter(setup):
    """The padded buckets a GPU replays as CUDA graphs (run eagerly here): adapters, base rows and pad rows mixed;
    the NaN-filled pool catches a pad row that stored."""
    root, _, _, requests = setup
    eager = LLM(root / "base", enable_lora=True, max_loras=2, max_lora_rank=8, **ENGINE)
    static = LLM(root / "base", enable_lora=True, max_loras=2, max_lora_rank=8, **ENGINE)
    static.runner.static_decoder = StaticDecoder(static.model, static.kv, 8, static.device, capture=False)
    static.kv.k.fill_(float("nan"))
    static.kv.v.fill_(float("nan"))
    prompts = [random_prompt(random.randint(3, 9)) for _ in range(5)]
    loras = [requests["all"], None, requests["some"], requests["all"], None]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0) for n in (2, 9, 5, 7, 3)]
    want = eager.generate(prompts, params, use_tqdm=False, lora_request=loras)
    got = static.generate(prompts, params, use_tqdm=False, lora_request=loras)
    for a, b in zip(got, want):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        la = torch.tensor([d[t] for d, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)])
        lb = torch.tensor([d[t] for d, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids)])
        assert rel_err(la, lb) < 1e-5


# ---------------------------------------------------------------------------------------------- refusals
def rewrite_config(directory, **fields):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **fields}))


def test_adapters_that_cannot_be_served_are_refused_by_name(setup, tmp_path):
    root, base, _, requests = setup
    llm = LLM(root / "base", enable_lora=True, max_lora_rank=4, **ENGINE)

    def refused(path, match, name="x", lora_id=7):
        with pytest.raises(ValueError, match=match):
            llm.generate([1, 2], SamplingParams(max_tokens=1), lora_request=LoRARequest(name, lora_id, str(path)))

    refused(tmp_path / "missing", "does not exist")
    refused(root / "some", "rank 8, above max_lora_rank=4")
    for field, value, match in [("use_dora", True, "DoRA"), ("modules_to_save", ["lm_head"], "modules_to_save"),
                                ("bias", "all", "trained biases"), ("peft_type", "IA3", "not LORA")]:  # fmt: skip
        bad = tmp_path / field
        make_adapter(base.float(), bad, r=2, target_modules=ALL)
        rewrite_config(bad, **{field: value})
        refused(bad, match)
    damaged = {  # hand-edited or broken files: one clear error each, never a crash mid-load
        "list": ("adapter_config.json", "[1, 2]", "holds a JSON list, not an object"),
        "not json": ("adapter_config.json", "{r: 4", "is not readable JSON"),
        "alpha": ("adapter_config.json", json.dumps({"r": 2, "lora_alpha": "big"}), "alphas .* must be numbers"),
        "rank": ("adapter_config.json", json.dumps({"r": 0}), "ranks .* must be positive integers"),
        "pattern": ("adapter_config.json", json.dumps({"r": 2, "alpha_pattern": {"(": 2}}), "not a regular expr"),
        "weights": ("adapter_model.safetensors", "not safetensors", "is not a readable safetensors file"),
    }
    for name, (file, text, match) in damaged.items():
        bad = tmp_path / name
        make_adapter(base.float(), bad, r=2, target_modules=ALL)
        (bad / file).write_text(text)
        refused(bad, match)
    wide = tmp_path / "wide"
    make_adapter(make_hf_model(n_embd=32), wide, r=2, target_modules=ALL)
    refused(wide, r"lora_A \(2, 32\).*needs \[r, 64\]")
    embedding = tmp_path / "embedding"
    make_adapter(base.float(), embedding, r=2, target_modules=["wte", "c_attn"])
    refused(embedding, "wte.* is not a LoRA weight of GPT-2's c_attn, c_proj or c_fc")
    llm.generate([1, 2], SamplingParams(max_tokens=1), lora_request=requests["all"])
    refused(root / "rs", "lora_int_id 1 is already adapter 'all'", name="all", lora_id=1)
    assert not llm.llm_engine.has_unfinished_requests()


def test_lora_arguments_are_checked(setup):
    root, _, _, requests = setup
    with pytest.raises(ValueError, match="needs an engine made with enable_lora=True"):
        LLM(root / "base", **ENGINE).generate([1, 2], lora_request=requests["all"])
    with pytest.raises(ValueError, match="max_cpu_loras=1 is below max_loras=2"):
        LLM(root / "base", enable_lora=True, max_loras=2, max_cpu_loras=1, **ENGINE)
    with pytest.raises(ValueError, match="max_lora_rank must be a positive integer"):
        LLM(root / "base", enable_lora=True, max_lora_rank=0, **ENGINE)
    with pytest.raises(ValueError, match="lora_int_id must be a positive integer"):
        LoRARequest("a", 0, "/x")
    llm = LLM(root / "base", enable_lora=True, **ENGINE)
    with pytest.raises(ValueError, match="one \\(or None\\) per prompt"):
        llm.generate([[1, 2], [3]], lora_request=[requests["all"]])
    with pytest.raises(ValueError, match="must be a LoRARequest"):
        llm.generate([1, 2], lora_request=[root / "all"])
