"""bench/bench_decode.py's runners on the tiny checkpoint: ours and transformers' return the same tokens, greedy, by
beam search, with n-gram speculation and with a draft model, which is what the script checks before it times
anything. Rates are printed, never asserted."""

from __future__ import annotations

import argparse
import random

import pytest
import torch

from bench import bench_decode
from engine import LLM
from tests.helpers import make_hf_model, prompt_with_a_repeat_ahead, save_checkpoint


def test_our_runners_and_transformers_agree(tiny_checkpoint, hf_model):
    llm = LLM(str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu", progress=False)
    ids = torch.randint(0, hf_model.config.vocab_size, (2, random.randint(2, 8))).tolist()
    n = random.randint(2, 6)
    assert bench_decode.ours(llm)(ids, n) == bench_decode.theirs(hf_model)(ids, n)
    width = random.randint(2, 4)
    beams = bench_decode.ours_beams(llm, width)(ids, n)
    assert beams == bench_decode.theirs_beams(hf_model, width)(ids, n)
    assert [len(b) for b in beams] == [width, width] and all(len(t) == n for b in beams for t in b)


def test_lora_runners_agree(tiny_checkpoint, hf_model, tmp_path):
    """Ours and PEFT's model write the same tokens with three adapters mixed in a batch, and the adapters change
    them."""
    import copy

    kw = dict(backend="torch", dtype="float32", device="cpu", progress=False)
    llm = LLM(str(tiny_checkpoint), enable_lora=True, max_lora_rank=8, max_loras=3, **kw)
    peft_model, loras = bench_decode.add_adapters(copy.deepcopy(hf_model), 8, str(tmp_path), count=3, std=0.3)
    ids = torch.randint(0, hf_model.config.vocab_size, (4, random.randint(2, 8))).tolist()
    n = random.randint(4, 8)
    with_adapters = bench_decode.ours(llm, loras)(ids, n)
    assert with_adapters == bench_decode.theirs_adapters(peft_model, loras)(ids, n)
    assert with_adapters != bench_decode.ours(llm)(ids, n)


def test_speculating_runners_agree_with_plain_greedy(tiny_checkpoint, hf_model):
    """A prompt the model's first token already occurs in, so that the lookups hit from the first decode step."""
    lookup = dict(num_speculative_tokens=3, prompt_lookup_max=bench_decode.LOOKUP_MAX)
    kw = dict(backend="torch", dtype="float32", device="cpu", progress=False)
    llm = LLM(str(tiny_checkpoint), speculative_config=lookup, **kw)
    ids = [prompt_with_a_repeat_ahead(LLM(str(tiny_checkpoint), **kw), 1)]
    n = random.randint(4, 12)
    greedy = bench_decode.theirs(hf_model)(ids, n)
    assert bench_decode.ours(llm)(ids, n) == greedy
    assert bench_decode.theirs_lookup(hf_model, 3, bench_decode.LOOKUP_MAX)(ids, n) == greedy
    assert llm.llm_engine.get_stats().spec_decode_num_drafts > 0


def test_draft_model_runners_agree_with_plain_greedy(tiny_checkpoint, hf_model, tmp_path):
    """Ours and transformers' assisted generation, drafted by the same smaller random model."""
    draft = make_hf_model(n_embd=32, n_head=2, n_layer=1)
    save_checkpoint(draft, tmp_path)
    config = dict(num_speculative_tokens=3, model=str(tmp_path))
    llm = LLM(str(tiny_checkpoint), speculative_config=config, backend="torch", dtype="float32", device="cpu",
              progress=False)  # fmt: skip
    ids = torch.randint(0, hf_model.config.vocab_size, (2, random.randint(2, 8))).tolist()
    n = random.randint(4, 12)
    greedy = bench_decode.theirs(hf_model)(ids, n)
    assert bench_decode.ours(llm)(ids, n) == greedy
    assert bench_decode.theirs_assisted(hf_model, draft, 3)(ids, n) == greedy
    assert llm.llm_engine.get_stats().spec_decode_num_drafts > 0


def test_draft_names_are_presets_or_the_targets_first_blocks():
    n = random.randint(1, 48)
    assert [bench_decode.draft_name(name) for name in ("gpt2", f"layers:{n}")] == ["gpt2", f"layers:{n}"]
    for bad in ("layers:0", "layers:", "layers:x", "gpt3", "2"):
        with pytest.raises(argparse.ArgumentTypeError, match="layers:N"):
            bench_decode.draft_name(bad)
