"""``bench/throughput.py`` end to end on a tiny checkpoint: every system runs, ours validates against transformers
before timing, and the JSON holds what the README says. Timings are never asserted."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import make_hf_model, save_checkpoint

BENCH = Path(__file__).resolve().parents[2] / "bench" / "throughput.py"
RESULT_FIELDS = {"scenario", "system", "label", "details", "elapsed_s", "num_requests", "prompt_tokens",
                 "output_tokens", "validated", "full_length", "cpu_s", "agree_with_ours", "prompt_tokens_computed",
                 "prefix_cache_hits", "num_preemptions", "spec_decode_acceptance_rate", "notes", "requests_per_s",
                 "total_tokens_per_s", "output_tokens_per_s"}  # fmt: skip


def load_bench(monkeypatch):
    """The script as a module (bench/ is not a package: load the file)."""
    spec = importlib.util.spec_from_file_location("bench_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def run_bench(argv: list[str], monkeypatch) -> int:
    """The script's ``main`` in this process."""
    module = load_bench(monkeypatch)
    threads = torch.get_num_threads()
    try:
        return module.main(argv)
    finally:
        torch.set_num_threads(threads)  # the bench's --threads must not leak into later tests


@pytest.mark.parametrize("n", [1, 2])
def test_throughput_bench_json(tmp_path, monkeypatch, n):
    checkpoint = save_checkpoint(make_hf_model(n_positions=128), tmp_path / "ckpt")
    out = tmp_path / "throughput.json"
    scenario = "all" if n == 1 else "random"
    # a 32-token prefix is two full blocks; a 48-token step budget admits the first prompt and part of the second,
    # so the later prompts find the prefix computed and cached
    argv = ["--model", str(checkpoint), "--scenario", scenario, "--num-prompts", "4", "--input-len", "6",
            "--output-len", "3", "--prefix-len", "32", "--n", str(n), "--max-num-seqs", "8",
            "--max-num-batched-tokens", "48", "--hf-batch-size", "2", "--peers", "generate", "generate_batch",
            "--validate-tokens", "3", "--threads", "1", "--output-json", str(out)]  # fmt: skip
    assert run_bench(argv, monkeypatch) == 0
    report = json.loads(out.read_text())

    assert {"cpu", "cores", "torch", "transformers", "date", "git_commit"} <= set(report["machine"])
    assert report["args"]["n"] == n
    expected = {"random": ["ours", "generate", "generate_batch"]}
    if n == 1:
        expected["prefix"] = ["ours", "ours_no_prefix_caching", "generate", "generate_batch"]
    assert set(report["scenarios"]) == set(expected)
    for name, systems in expected.items():
        scenario = report["scenarios"][name]
        assert scenario["workload"]["num_prompts"] == 4 and scenario["workload"]["n"] == n
        results = {r["system"]: r for r in scenario["results"]}
        assert list(results) == systems
        for r in results.values():
            assert set(r) == RESULT_FIELDS
            assert r["validated"] is True, r  # greedy tokens equal transformers' before timing
            assert r["full_length"] is True, r  # every completion generated exactly its output length
            assert r["output_tokens"] == scenario["workload"]["output_tokens"]
            assert r["elapsed_s"] > 0 and r["output_tokens_per_s"] > 0
        assert {f"ours/{s}" for s in systems if s in ("generate", "generate_batch")} <= set(scenario["ratios"])
    if n == 1:
        prefix = {r["system"]: r for r in report["scenarios"]["prefix"]["results"]}
        assert prefix["ours"]["prefix_cache_hits"] > 0
        assert prefix["ours_no_prefix_caching"]["prefix_cache_hits"] == 0
        assert prefix["ours_no_prefix_caching"]["prompt_tokens_computed"] == prefix["ours"]["prompt_tokens"]
        assert {"prompt_tokens_computed_off/on", "prefix_caching_speedup"} <= set(
            report["scenarios"]["prefix"]["ratios"]
        )
    assert [g["status"] for g in report["goals"]] and all(
        g["status"] in ("PASS", "MISS", "SKIP") for g in report["goals"]
    )


def test_ours_speculating_over_the_prefix_cache(tmp_path, monkeypatch):
    """``--speculative-config`` as the CLI takes it: both of ours speculate (here with the checkpoint as its own
    draft, so every greedy draft lands), validate against transformers, and report their acceptance."""
    checkpoint = save_checkpoint(make_hf_model(n_positions=128), tmp_path / "ckpt")
    out = tmp_path / "throughput.json"
    config = json.dumps({"model": str(checkpoint), "num_speculative_tokens": 3})
    argv = ["--model", str(checkpoint), "--scenario", "prefix", "--num-prompts", "3", "--input-len", "6",
            "--output-len", "8", "--prefix-len", "32", "--max-num-seqs", "8", "--max-num-batched-tokens", "48",
            "--peers", "--validate-tokens", "3", "--threads", "1", "--speculative-config", config,
            "--output-json", str(out)]  # fmt: skip
    assert run_bench(argv, monkeypatch) == 0
    report = json.loads(out.read_text())
    assert report["args"]["speculative_config"]["num_speculative_tokens"] == 3
    results = {r["system"]: r for r in report["scenarios"]["prefix"]["results"]}
    assert set(results) == {"ours", "ours_no_prefix_caching"}
    for r in results.values():
        assert r["validated"] is True and r["full_length"] is True, r
        assert r["spec_decode_acceptance_rate"] == 1.0
    assert results["ours"]["prefix_cache_hits"] > 0


def test_a_draft_preset_gets_random_weights_of_its_own_with_dummy_weights(tmp_path, monkeypatch):
    module = load_bench(monkeypatch)
    monkeypatch.setitem(module.PRESETS, "tiny", dict(n_layer=1, n_embd=32, n_head=2, vocab_size=1000))
    for load_format, model, written in [
        ("dummy", "tiny", True),
        ("auto", "tiny", False),
        ("dummy", str(tmp_path), False),
    ]:
        args = SimpleNamespace(load_format=load_format, seed=random.randrange(100),
                               speculative_config={"model": model, "num_speculative_tokens": 2})  # fmt: skip
        module.random_draft(args, tmp_path / "draft")
        assert args.speculative_config["model"] == (str(tmp_path / "draft") if written else model)
    assert json.loads((tmp_path / "draft" / "config.json").read_text())["n_embd"] == 32


class FixedLogits:
    """A stand-in for transformers' model whose next-token logits are ``logits`` whatever the prefix."""

    device = torch.device("cpu")

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def __call__(self, ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits.expand(1, ids.shape[1], -1))


def test_greedy_validation_excuses_only_near_ties(monkeypatch):
    """A completion that leaves transformers' greedy one is valid only where the token it took instead sits within the
    dtype's near-tie of the pick (a fraction of the largest |logit|): in bf16 a small gap is, in fp32 it is not, and a
    gap twice bf16's never is. Equal completions are valid; a short one is not."""
    bench = load_bench(monkeypatch)
    logits = torch.randn(64)
    pick, other = logits.topk(2).indices.tolist()
    largest = logits.abs().max()
    prompt, ref = torch.randint(64, (5,)).tolist(), [pick] * 4

    def check(gap: float, dtype: str) -> bool:
        moved = logits.clone()
        moved[other] = logits[pick] - gap * largest  # still below the pick: the pick stays the row's top
        return bench.matches_greedy(FixedLogits(moved), prompt, ref, [pick, other, other, pick], dtype)[0]

    tie = bench.NEAR_TIE["bfloat16"]
    assert check(tie / 2, "bfloat16")
    assert not check(tie / 2, "float32")
    assert not check(2 * tie, "bfloat16")
    model = FixedLogits(logits)
    assert bench.matches_greedy(model, prompt, ref, list(ref), "float32") == (True, "equal")
    assert not bench.matches_greedy(model, prompt, ref, ref[:-1], "bfloat16")[0]
