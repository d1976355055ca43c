"""Every request feature at once, through an engine that speculates, schedules by priority and has to preempt: the
greedy requests come out as a plain engine makes them, each request keeps its constraints (structured outputs,
allowed tokens, bad words, stops), and the pool is whole at the end."""

from __future__ import annotations

import random
import re

from engine import LLM, SamplingParams, StructuredOutputsParams

EOS = 50256
ENGINE = dict(backend="torch", dtype="float32", device="cpu", progress=False, block_size=4)
PATTERN = r"[a-z]{1,4}( [0-9]{1,2}){1,3}"


def random_request(tok) -> tuple[list[int], SamplingParams]:
    prompt = [random.randrange(EOS) for _ in range(random.randint(1, 16))]
    greedy = random.random() < 0.6
    kw = dict(max_tokens=random.randint(1, 20), temperature=0.0 if greedy else random.uniform(0.5, 1.5),
              n=random.choice([1, 1, 2]), logprobs=random.choice([None, 0, 3]))  # fmt: skip
    feature = random.choice(["none", "min_p", "top_k", "bad_words", "allowed", "choice", "regex", "stop", "seed"])
    if feature == "min_p":
        kw["min_p"] = random.uniform(0.05, 0.5)
    elif feature == "top_k":
        kw["top_k"] = random.randint(1, 50)
    elif feature == "bad_words":
        kw["bad_words"] = [tok.decode([random.randrange(EOS)]).strip() or "the" for _ in range(3)]
    elif feature == "allowed":
        kw["allowed_token_ids"] = random.sample(range(EOS), random.randint(1, 8))
    elif feature == "choice":
        kw["structured_outputs"] = StructuredOutputsParams(choice=["alpha", "beta gamma", "δ"])
    elif feature == "regex":
        kw["structured_outputs"] = StructuredOutputsParams(regex=PATTERN)
    elif feature == "stop":
        kw.update(stop=[random.choice(["e", " the", "a"])], include_stop_str_in_output=random.random() < 0.5)
    elif feature == "seed":
        kw["seed"] = random.randrange(1 << 20)
    if "structured_outputs" not in kw:
        kw["ignore_eos"] = random.random() < 0.5
    return prompt, SamplingParams(**kw)


def check_constraints(tok, params: SamplingParams, out) -> None:
    for c in out.outputs:
        assert len(c.token_ids) <= params.max_tokens and c.finish_reason in ("stop", "length")
        if params.allowed_token_ids:
            assert set(c.token_ids) <= set(params.allowed_token_ids)
        if params.bad_words:
            for word in params.bad_words:
                for ids in (tok.encode(word), tok.encode(" " + word.lstrip(" "))):
                    assert not any(c.token_ids[k : k + len(ids)] == ids for k in range(len(c.token_ids)))
        so = params.structured_outputs
        if so is not None and c.finish_reason == "stop":
            assert c.text in so.choice if so.choice else re.fullmatch(PATTERN, c.text)
        if params.logprobs is not None:
            assert len(c.logprobs) == len(c.token_ids)


def test_every_feature_at_once(tiny_checkpoint):
    busy = LLM(str(tiny_checkpoint), speculative_config={"num_speculative_tokens": 3}, scheduling_policy="priority",
               num_blocks=40, max_num_seqs=12, **ENGINE)  # fmt: skip
    plain = LLM(str(tiny_checkpoint), **ENGINE)
    tok = busy.get_tokenizer()
    requests = [random_request(tok) for _ in range(40)]
    for _ in range(4):  # long greedy pairs that outgrow the pool together: preemption
        head = [random.randrange(EOS) for _ in range(12)]  # the prompt ends as it began: the first lookups hit
        requests.append((head + head[:3], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, n=2)))
    random.shuffle(requests)
    prompts, params = [p for p, _ in requests], [sp for _, sp in requests]
    outs = busy.generate(prompts, params, priority=[random.randint(-2, 2) for _ in requests], use_tqdm=False)
    for sp, out in zip(params, outs):
        check_constraints(tok, sp, out)
    greedy = [i for i, sp in enumerate(params) if sp.temperature == 0.0]
    want = plain.generate([prompts[i] for i in greedy], [params[i] for i in greedy], use_tqdm=False)
    for i, w in zip(greedy, want):
        assert [c.token_ids for c in outs[i].outputs] == [c.token_ids for c in w.outputs]
        assert [c.text for c in outs[i].outputs] == [c.text for c in w.outputs]
    stats = busy.llm_engine.get_stats()
    assert stats.num_preemptions > 0 and stats.spec_decode_num_drafts > 0
    assert stats.generation_tokens == sum(len(c.token_ids) for out in outs for c in out.outputs)
    assert busy.blocks.num_free == busy.blocks.num_blocks
