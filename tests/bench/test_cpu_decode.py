"""bench/cpu_decode.py on a tiny checkpoint: every format runs and reports, ``measure_decode`` returns its rates,
the bandwidth floor counts the bytes the weights really hold. Rates are printed, never asserted."""

from __future__ import annotations

import torch

from bench import cpu_decode
from engine.config import ModelConfig
from engine.weights import LINEAR_FIELDS, random_weights


def test_measure_decode_returns_prefill_and_decode_rates(tiny_checkpoint):
    r = cpu_decode.measure_decode(str(tiny_checkpoint), "float32", None, batch=2, prompt_tokens=5, new_tokens=4,
                                  repeats=2)  # fmt: skip
    assert len(r["prefill_runs"]) == len(r["decode_runs"]) == 2
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0


def test_every_format_runs(tiny_checkpoint, capsys):
    argv = ["--model", str(tiny_checkpoint), "--batch", "1", "3", "--prompt-len", "4", "--new-tokens", "3",
            "--repeats", "1", "--threads", "1"]  # fmt: skip
    assert cpu_decode.main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [(f, b) for f in cpu_decode.FORMATS for b in ("1", "3")]


def test_bad_arguments_exit_2(capsys):
    assert cpu_decode.main(["--batch", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_floor_counts_the_weights_bytes():
    config = ModelConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=32)
    w = random_weights(config, torch.float32, "cpu")
    linear = sum(getattr(layer, f).numel() for layer in w.layers for f in LINEAR_FIELDS)
    assert cpu_decode.bytes_per_step(config, "float32", None, 1, 0) == 4 * (linear + w.head.numel())
    assert cpu_decode.bytes_per_step(config, "bfloat16", "int8", 1, 0) == linear + 2 * w.head.numel()
    kv = 3 * 10 * config.n_layer * 2 * config.n_embd * 4  # 3 sequences, 10 tokens each, K and V
    assert cpu_decode.bytes_per_step(config, "float32", None, 3, 10) == 4 * (linear + w.head.numel()) + kv
