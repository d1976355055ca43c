"""The public surface: LLM arguments and request errors, the transformers-style pipeline, and the CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from engine import LLM, BeamSearchParams, LoRARequest, SamplingParams, pipeline, set_seed
from tests.helpers import make_adapter, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), backend="torch", device="cpu", progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backend="cuda"), "backend"),
        (dict(dtype="float64"), "dtype"),
        (dict(device="tpu"), "device"),
        (dict(block_size=0), "block_size"),
        (dict(num_blocks=-3), "num_blocks"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(load_format="pt"), "load_format"),
        (dict(quantization="fp8"), "quantization"),
        (dict(split_special_tokens="yes"), "split_special_tokens"),
        (dict(max_model_len=0), "max_model_len"),
        (dict(max_model_len=129), "max_model_len=129 exceeds the model's context of 128"),
        (dict(kv_cache_memory=16), "kv_cache_memory"),
        (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
        (dict(gpu_memory_utilization=0.5, kv_cache_memory=1 << 20), "not both"),
        (dict(gpu_memory_utilization=0.5, device="cpu"), "gpu_memory_utilization sizes a CUDA device's pool"),
    ],
)
def test_bad_llm_arguments(tiny_checkpoint, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(tiny_checkpoint), **{"progress": False, **kwargs})


def test_special_token_text_is_token_50256_unless_split(tiny_checkpoint):
    """Prompt text holding ``<|endoftext|>`` reaches the model as token 50256 (transformers' default), or spelled
    out in ordinary tokens with ``split_special_tokens=True``."""
    text = "Hello<|endoftext|> world"
    default = LLM(str(tiny_checkpoint), backend="torch", device="cpu", progress=False)
    literal = LLM(str(tiny_checkpoint), backend="torch", device="cpu", progress=False, split_special_tokens=True)
    params = SamplingParams(max_tokens=1, temperature=0)
    assert default.generate(text, params, use_tqdm=False)[0].prompt_token_ids == [15496, 50256, 995]
    ids = literal.generate(text, params, use_tqdm=False)[0].prompt_token_ids
    assert 50256 not in ids and literal.get_tokenizer().decode(ids) == text


def test_bad_requests(llm):
    n_ctx = llm.config.n_positions
    with pytest.raises(ValueError, match="exceeds the model's context"):
        llm.generate([1] * (n_ctx - 3), SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([1, llm.config.vocab_size], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", SamplingParams())
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(ValueError, match="string or a list of token ids"):
        llm.generate([3.5], SamplingParams())
    with pytest.raises(ValueError, match="stride"):
        llm.score("some text to score", stride=0)
    with pytest.raises(ValueError, match="at least 2"):
        llm.score([5])
    with pytest.raises(ValueError, match="context"):
        llm.features([1] * (n_ctx + 1))
    # nothing was left allocated by the refused requests
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_prompts_as_vllm_dicts_and_sampling_params_by_name(llm):
    """vLLM's ``TextPrompt`` / ``TokensPrompt`` dicts, alone or in a list, and its keyword ``sampling_params``."""
    text = f"Hello world, number {random.randrange(1000)}"
    ids = llm.get_tokenizer().encode(text)
    params = SamplingParams(max_tokens=4, temperature=0)
    want = [o.outputs[0].token_ids for o in llm.generate([text, ids], params, use_tqdm=False)]
    got = llm.generate([{"prompt": text}, {"prompt_token_ids": ids}], sampling_params=params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want
    assert (got[0].prompt, got[1].prompt) == (text, None)
    alone = llm.generate({"prompt_token_ids": ids}, sampling_params=params, use_tqdm=False)
    assert alone[0].outputs[0].token_ids == want[1]
    with pytest.raises(ValueError, match=r"prompt 0: a prompt dict .* got keys \['multi_modal_data', 'prompt'\]"):
        llm.generate({"prompt": text, "multi_modal_data": {}}, params)


def test_truncate_prompt_tokens_keeps_the_prompts_end(llm):
    """vLLM's left truncation: a prompt past the context, cut to its last k tokens, is generated from as those k
    tokens alone would be; -1 cuts it to the context's worth (which leaves no room for new tokens, as in vLLM)."""
    n_ctx = llm.config.n_positions
    long = [random.randrange(50256) for _ in range(n_ctx + random.randint(1, 50))]
    k = random.randint(1, n_ctx - 8)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    cut = llm.generate(long, replace(params, truncate_prompt_tokens=k), use_tqdm=False)[0]
    alone = llm.generate(long[-k:], params, use_tqdm=False)[0]
    assert cut.prompt_token_ids == long[-k:] and cut.outputs[0].token_ids == alone.outputs[0].token_ids
    with pytest.raises(ValueError, match=f"{n_ctx} prompt tokens"):  # -1: as vLLM, the context, so no room left
        llm.generate(long, replace(params, truncate_prompt_tokens=-1))
    with pytest.raises(ValueError, match="truncate_prompt_tokens=.* exceeds"):
        llm.generate(long, replace(params, truncate_prompt_tokens=n_ctx + 1))
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            SamplingParams(truncate_prompt_tokens=bad)


def test_priority_scheduling(tiny_checkpoint):
    """vLLM's scheduling_policy="priority": one sequence at a time, requests finish in priority order (then arrival),
    with the tokens they get under first come first served; priority without the policy is refused."""
    from engine import LLMEngine

    kw = dict(backend="torch", dtype="float32", device="cpu", progress=False)
    engine = LLMEngine(str(tiny_checkpoint), scheduling_policy="priority", max_num_seqs=1, **kw)
    ranks = random.sample(range(-5, 5), 4) + [0]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    prompts = [[random.randrange(50256) for _ in range(5)] for _ in ranks]
    for i, (prompt, rank) in enumerate(zip(prompts, ranks)):
        engine.add_request(str(i), prompt, params, priority=rank)
    finished, tokens = [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            finished += [int(out.request_id)] * out.finished
            tokens[int(out.request_id)] = out.outputs[0].token_ids
    assert finished == sorted(range(len(ranks)), key=lambda i: (ranks[i], i))
    fcfs = LLM(str(tiny_checkpoint), **kw).generate(prompts, params, use_tqdm=False)
    assert [tokens[i] for i in range(len(ranks))] == [o.outputs[0].token_ids for o in fcfs]
    llm = LLM(str(tiny_checkpoint), scheduling_policy="priority", **kw)
    out = llm.generate(prompts, params, priority=ranks, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in fcfs]
    with pytest.raises(ValueError, match="one integer per prompt"):
        llm.generate(prompts, params, priority=[0])
    with pytest.raises(ValueError, match="scheduling_policy='priority'"):
        LLM(str(tiny_checkpoint), **kw).generate(prompts, params, priority=ranks)
    with pytest.raises(ValueError, match="scheduling_policy must be"):
        LLM(str(tiny_checkpoint), scheduling_policy="lifo", **kw)


def test_max_model_len_bounds_requests_and_sizes_the_pool(tiny_checkpoint):
    """vLLM's ``max_model_len`` below the context: longer requests are refused naming it, the pool holds
    ``max_num_seqs`` sequences of that length (when memory allows), and requests within it run."""
    from engine.kv_cache import KVCache

    cap = random.randint(16, 120)
    kw = dict(device="cpu", block_size=4, max_num_seqs=3, progress=False)
    llm = LLM(str(tiny_checkpoint), max_model_len=cap, kv_cache_memory=1 << 30, **kw)
    assert llm.max_model_len == cap and llm.blocks.num_blocks == 3 * -(-cap // 4)
    with pytest.raises(ValueError, match=f"context of {cap} tokens \\(max_model_len\\)"):
        llm.generate([1] * (cap - 3), SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="max_model_len"):
        llm.features([[1] * (cap + 1)])
    out = llm.generate([1] * (cap - 4), SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    per_block = KVCache.bytes_per_block(llm.config, 4, llm.dtype)
    blocks = random.randint(2, 9)
    assert LLM(str(tiny_checkpoint), kv_cache_memory=per_block * blocks + 7, **kw).blocks.num_blocks == blocks


def test_start_up_logs_the_pool_and_its_concurrency(tiny_checkpoint, caplog):
    """vLLM's start-up line: how many tokens the pool holds and how many full-length requests at once."""
    blocks, max_len = random.randint(5, 200), random.randint(5, 64)
    with caplog.at_level("INFO", logger="gpt2_triton.engine"):
        LLM(str(tiny_checkpoint), device="cpu", block_size=4, num_blocks=blocks, max_model_len=max_len, progress=False)
    want = f"KV cache: {blocks} blocks of 4 tokens ({4 * blocks} tokens, "
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache")]
    assert line.startswith(want), line
    assert line.endswith(f"maximum concurrency for {max_len} tokens per request: {blocks / -(-max_len // 4):.2f}x")


def test_request_larger_than_the_whole_pool_is_refused(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint), device="cpu", block_size=4, num_blocks=5, progress=False)
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate([1] * 10, SamplingParams(max_tokens=15))  # 24 cached tokens -> 6 blocks > 5
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate([1] * 4, SamplingParams(max_tokens=5, n=3))  # 3 x 2 blocks > 5
    out = llm.generate([1] * 10, SamplingParams(max_tokens=11, ignore_eos=True), use_tqdm=False)  # 20: fits
    assert len(out[0].outputs[0].token_ids) == 11


def test_reset_prefix_cache_makes_the_next_prompts_compute_afresh(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint), device="cpu", block_size=4, progress=False)
    prompt = [random.randrange(50257) for _ in range(random.randint(9, 20))]
    params = SamplingParams(max_tokens=1)
    llm.generate(prompt, params, use_tqdm=False)
    assert llm.generate(prompt, params, use_tqdm=False)[0].num_cached_tokens == (len(prompt) - 1) // 4 * 4
    assert llm.reset_prefix_cache()
    assert llm.generate(prompt, params, use_tqdm=False)[0].num_cached_tokens == 0


def test_dummy_weights_run_without_files():
    llm = LLM("gpt2", load_format="dummy", device="cpu", progress=False)
    assert llm.config.n_layer == 12 and llm.config.n_embd == 768
    ids = torch.randint(0, 50257, (5,)).tolist()
    out = llm.generate(ids, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_pipeline_matches_the_model_card(tiny_checkpoint):
    generator = pipeline("text-generation", model=str(tiny_checkpoint), device="cpu", progress=False)
    set_seed(42)
    prompt = "Hello, I'm a language model,"
    out = generator(prompt, max_length=30, num_return_sequences=5)
    assert len(out) == 5 and all(o["generated_text"].startswith(prompt) for o in out)
    set_seed(42)
    again = generator(prompt, max_length=30, num_return_sequences=5)
    assert again == out
    set_seed(42)
    ids = generator(prompt, max_length=30, num_return_sequences=5, return_tensors=True)
    tok = generator.llm.get_tokenizer()
    for o, text in zip(ids, out):
        new = o["generated_token_ids"][len(tok.encode(prompt)) :]
        if tok.eos_token_id in new:  # stopped early; EOS, then EOS as padding up to the longest, is not text
            new = new[: new.index(tok.eos_token_id)]
        assert text["generated_text"] == prompt + tok.decode(new)
    rows = [o["generated_token_ids"] for o in ids]
    assert {len(row) for row in rows} == {30} or all(tok.eos_token_id in row for row in rows)  # max_length counts
    assert len({len(row) for row in rows}) == 1  # the prompt; shorter rows are padded as transformers pads them
    with pytest.raises(ValueError, match="task"):
        pipeline("summarization", model=str(tiny_checkpoint))
    # min_p 1 keeps only the most likely token: sampling is then greedy decoding
    assert generator(prompt, max_new_tokens=8, min_p=1.0) == generator(prompt, max_new_tokens=8, do_sample=False)


def test_pipeline_with_an_assistant_model_generates_what_it_generates_alone(tiny_checkpoint):
    """transformers' ``assistant_model``: drafts from that model (here the checkpoint itself), the same text."""
    kw = dict(device="cpu", progress=False)
    assisted = pipeline("text-generation", model=str(tiny_checkpoint), assistant_model=str(tiny_checkpoint), **kw)
    alone = pipeline("text-generation", model=str(tiny_checkpoint), **kw)
    prompt = f"Hello, I'm language model number {random.randint(0, 99)},"
    want = alone(prompt, max_new_tokens=12, do_sample=False)
    assert assisted(prompt, max_new_tokens=12, do_sample=False) == want
    assert assisted.llm.llm_engine.get_stats().spec_decode_num_accepted_tokens > 0
    both = {"speculative_config": {"num_speculative_tokens": 2}}
    for task, extra, match in [("feature-extraction", {}, "text-generation"), ("text-generation", both, "not both")]:
        with pytest.raises(ValueError, match=match):
            pipeline(task, model=str(tiny_checkpoint), assistant_model=str(tiny_checkpoint), **kw, **extra)


def test_feature_extraction_pipeline_is_transformers(tiny_checkpoint, hf_model, gpt2_tokenizer_dir):
    import transformers

    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir))
    theirs = transformers.pipeline("feature-extraction", model=str(tiny_checkpoint), tokenizer=tokenizer, device="cpu")
    ours = pipeline("feature-extraction", model=str(tiny_checkpoint), device="cpu", progress=False)
    texts = ["Hello, I'm a language model,", f"number {random.randint(0, 10**6)} of a list"]
    one = ours(texts[0])
    assert len(one) == 1 and len(one[0][0]) == hf_model.config.n_embd
    assert rel_err(torch.tensor(one), torch.tensor(theirs(texts[0]))) < 1e-5
    for got, want in zip(ours(texts, return_tensors=True), theirs(texts, return_tensors=True), strict=True):
        assert got.shape == want.shape and rel_err(got, want) < 1e-5


CHAT = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}" + (
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_chat_renders_each_conversation_then_generates(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint), device="cpu", progress=False)
    hello = [{"role": "user", "content": f"Hi there, number {random.randint(0, 99)}"}]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    got = llm.chat(hello, params, use_tqdm=False, chat_template=CHAT)[0]
    prompt = f"user: {hello[0]['content']}\nassistant:"
    want = llm.generate(prompt, params, use_tqdm=False)[0]
    assert got.prompt == prompt and got.outputs[0].token_ids == want.outputs[0].token_ids
    answered = hello + [{"role": "assistant", "content": "Hello"}]
    both = llm.chat([hello, answered], params, use_tqdm=False, chat_template=CHAT, add_generation_prompt=False)
    assert [o.prompt for o in both] == [prompt.removesuffix("assistant:"), prompt.removesuffix("assistant:") +
                                        "assistant: Hello\n"]  # fmt: skip
    refusals = [(dict(), "no chat template"), (dict(chat_template="{% for %}"), "chat_template: line 1"),
                (dict(chat_template="{{ messages[5].content.upper() }}"), "failed on these messages")]  # fmt: skip
    for kwargs, match in refusals:
        with pytest.raises(ValueError, match=match):
            llm.chat(hello, params, use_tqdm=False, **kwargs)
    with pytest.raises(ValueError, match="messages must be a list of dicts"):
        llm.chat(["hi"], params, chat_template=CHAT)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_cli_generate_prints_a_continuation(tiny_checkpoint):
    prompt = "Hello, I'm a language model,"
    r = run_cli("generate", prompt, "--model", str(tiny_checkpoint), "--max-new-tokens", "8", "--seed",
                str(random.randrange(1000)), "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(prompt) and len(r.stdout.strip()) > len(prompt)
    r = run_cli("generate", prompt, "--model", str(tiny_checkpoint), "--max-new-tokens", "8", "--temperature", "0",
                "--stream", "--quiet")  # fmt: skip
    greedy = (
        LLM(str(tiny_checkpoint), device="cpu", progress=False)
        .generate(prompt, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)[0]
        .outputs[0]
    )
    assert r.returncode == 0 and r.stdout == prompt + greedy.text + "\n"
    r = run_cli("generate", prompt, "--model", str(tiny_checkpoint), "--max-new-tokens", "8", "--min-p", "1",
                "--quiet")  # fmt: skip
    assert r.returncode == 0 and r.stdout == prompt + greedy.text + "\n"  # min_p 1: only the favourite


def test_cli_generate_with_beams_prints_each_beam(tiny_checkpoint):
    prompt, beams = "Hello, I'm a language model,", random.randint(2, 4)
    r = run_cli("generate", prompt, "--model", str(tiny_checkpoint), "--max-new-tokens", "6", "--num-beams",
                str(beams), "--length-penalty", "0.5", "--early-stopping", "true", "--no-repeat-ngram-size", "1",
                "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    llm = LLM(str(tiny_checkpoint), device="cpu", progress=False)
    params = BeamSearchParams(beams, 6, length_penalty=0.5, early_stopping=True, no_repeat_ngram_size=1)
    want = llm.beam_search(prompt, params, use_tqdm=False)[0]
    header = "--- beam {}: score {:.4f} ({}) ---\n"
    assert r.stdout == "".join(header.format(i, s.score, s.finish_reason) + s.text + "\n"
                               for i, s in enumerate(want.sequences))  # fmt: skip


@pytest.mark.parametrize("drafter", ["ngram", "draft_model"])
def test_cli_generate_speculating_prints_the_greedy_continuation(tiny_checkpoint, drafter):
    prompt = "the cat sat on the mat and the cat sat on the"
    config = {"num_speculative_tokens": 3, **({"model": str(tiny_checkpoint)} if drafter == "draft_model" else {})}
    r = run_cli("generate", prompt, "--model", str(tiny_checkpoint), "--max-new-tokens", "12", "--temperature", "0",
                "--speculative-config", json.dumps(config), "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    greedy = LLM(str(tiny_checkpoint), device="cpu", progress=False).generate(
        prompt, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False
    )[0]
    assert r.stdout == prompt + greedy.outputs[0].text + "\n"


def test_cli_generate_with_a_lora_adapter(tiny_checkpoint, hf_model, tmp_path):
    """``--lora DIR``: the adapter's greedy continuation (its rank sized the engine), streamed or not, and by beams."""
    prompt, adapter = "Hello, I'm a language model,", tmp_path / "adapter"
    make_adapter(hf_model, adapter, r=24, target_modules=["c_attn", "c_fc"])
    llm = LLM(str(tiny_checkpoint), device="cpu", progress=False, enable_lora=True, max_lora_rank=24)
    lora = LoRARequest("adapter", 1, str(adapter))
    greedy = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False, lora_request=lora)
    base = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    assert greedy[0].outputs[0].text != base[0].outputs[0].text, "the adapter changes nothing: the test can't fail"
    for stream in ([], ["--stream"]):
        r = run_cli("generate", prompt, "--model", str(tiny_checkpoint), "--max-new-tokens", "8", "--temperature",
                    "0", "--lora", str(adapter), "--quiet", *stream)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.stdout == prompt + greedy[0].outputs[0].text + "\n"
    r = run_cli("generate", prompt, "--model", str(tiny_checkpoint), "--max-new-tokens", "4", "--num-beams", "2",
                "--lora", str(adapter), "--quiet")  # fmt: skip
    want = llm.beam_search(prompt, BeamSearchParams(2, 4), use_tqdm=False, lora_request=lora)[0]
    assert r.returncode == 0 and r.stdout.splitlines()[1] == want.sequences[0].text
    r = run_cli("generate", prompt, "--model", str(tiny_checkpoint), "--lora", str(tmp_path / "missing"), "--quiet")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "LoRA adapter directory" in r.stderr
    text = tmp_path / "text.txt"
    text.write_text(prompt * 3)
    r = run_cli("score", str(text), "--model", str(tiny_checkpoint), "--lora", str(adapter), "--json", "--quiet")
    want = llm.score(text.read_text(), lora_request=lora)[0].perplexity
    assert r.returncode == 0 and json.loads(r.stdout)["perplexity"] == pytest.approx(want, rel=1e-6)


def test_cli_generate_structured(tiny_checkpoint, tmp_path):
    prompt, choices = "Is the sky blue?", ["yes", "no", "it depends"]
    r = run_cli("generate", prompt, "--model", str(tiny_checkpoint), "--max-new-tokens", "8", "--n", "3", "--choice",
                *choices, "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    answers = [line.removeprefix(prompt) for line in r.stdout.splitlines() if not line.startswith("---")]
    assert len(answers) == 3 and set(answers) <= set(choices)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}))
    r = run_cli("generate", prompt, "--model", str(tiny_checkpoint), "--max-new-tokens", "12", "--json-schema",
                str(schema), "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.removeprefix(prompt))["ok"] in (True, False)


def test_cli_score(tiny_checkpoint, tmp_path):
    f = tmp_path / "text.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * random.randint(2, 5))
    r = run_cli("score", str(f), "--model", str(tiny_checkpoint), "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    import json

    got = json.loads(r.stdout)
    want = LLM(str(tiny_checkpoint), device="cpu", progress=False).score(f.read_text())[0]
    assert got["perplexity"] == pytest.approx(want.perplexity, rel=1e-6)


@pytest.mark.parametrize(
    "args, match",
    [
        (["generate", "hi", "--model", "/nonexistent/dir"], "nonexistent"),
        (["generate", "hi", "--max-new-tokens", "many"], "max-new-tokens"),
        (["generate", "hi", "--temperature", "-1", "--load-format", "dummy", "--model", "gpt2"], "--temperature must"),
        (["generate", "hi", "--max-new-tokens", "0", "--load-format", "dummy", "--model", "gpt2"], "--max-new-tokens"),
        (["generate", "hi", "--n", "2", "--stream"], "--stream"),
        (["generate", "hi", "--num-beams", "0", "--load-format", "dummy", "--model", "gpt2"], "--num-beams must"),
        (
            ["generate", "hi", "--no-repeat-ngram-size", "-1", "--load-format", "dummy", "--model", "gpt2"],
            "--no-repeat-ngram-size must",
        ),
        (["generate", "hi", "--num-beams", "2", "--stream"], "without --stream"),
        (["generate", "hi", "--early-stopping", "maybe"], "--early-stopping"),
        (["generate", "hi", "--speculative-config", "{num_speculative_tokens: 3}"], "--speculative-config"),
        (["generate", "hi", "--speculative-config", "[3]"], "--speculative-config"),
        (["generate", "hi", "--json-schema", "/nonexistent/schema.json"], "cannot read"),
        (["generate", "hi", "--regex", "a", "--choice", "b"], "not allowed with"),
        (["generate", "hi", "--choice", "a", "--num-beams", "2"], "structured outputs"),
        (["generate", "hi", "--speculative-config", '{"num_speculative_tokens": 0}'], "num_speculative_tokens must"),
        (
            [
                "generate",
                "hi",
                "--load-format",
                "dummy",
                "--model",
                "gpt2",
                "--speculative-config",
                '{"model": "/nonexistent", "num_speculative_tokens": 2}',
            ],
            "draft model '/nonexistent'",
        ),  # fmt: skip
        (["score", "/nonexistent/file.txt"], "cannot read"),
        (["frobnicate"], "invalid choice"),
        (["check-kernels", "--bogus"], "unrecognized arguments"),
    ],
)
def test_cli_errors_are_one_line_exit_2(args, match):
    r = run_cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in r.stderr
