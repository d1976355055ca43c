"""bench/bench_decode.py's runners on the tiny checkpoint: ours and transformers' return the same tokens, greedy and
by beam search, which is what the script checks before it times anything. Rates are printed, never asserted."""

from __future__ import annotations

import random

import torch

from bench import bench_decode
from engine import LLM


def test_our_runners_and_transformers_agree(tiny_checkpoint, hf_model):
    llm = LLM(str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu", progress=False)
    ids = torch.randint(0, hf_model.config.vocab_size, (2, random.randint(2, 8))).tolist()
    n = random.randint(2, 6)
    assert bench_decode.ours(llm)(ids, n) == bench_decode.theirs(hf_model)(ids, n)
    width = random.randint(2, 4)
    beams = bench_decode.ours_beams(llm, width)(ids, n)
    assert beams == bench_decode.theirs_beams(hf_model, width)(ids, n)
    assert [len(b) for b in beams] == [width, width] and all(len(t) == n for b in beams for t in b)
