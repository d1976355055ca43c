"""An ``LLMEngine`` whose forward pass is a stub, to time what the host does around it in each step.

The engine is real (scheduler, block manager, runner building the step's tensors, sampler, detokenizer, outputs);
only the model is replaced: it returns rows of a fixed random logits table. On a GPU the forward pass and the
sampler's math over ``[B, 50257]`` run on the device, asynchronously, so the table is ``HOST_VOCAB`` (128) columns
wide by default, GPT-2's first 128 tokens: the CPU then pays for dispatching each of the sampler's tensor ops, as it
would for launching it on a GPU, and not for the math. ``vocab=50257`` makes it a full CPU step instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine import LLMEngine, LoRARequest, RequestOutputKind, SamplingParams

HOST_VOCAB = 128  # logits columns when the math would run on a GPU (see the module's docstring)
TINY_MODEL = dict(n_layer=1, n_embd=64, n_head=1, n_positions=1024, vocab_size=50257)  # never run: the stub is


class StubModel:
    """Stands in for ``GPT2`` in the runner: every path returns the rows to sample, ``logits`` reads them off a
    fixed table."""

    def __init__(self, vocab: int, rows: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(rows, vocab, generator=g) * 4  # peaked enough that top-p keeps a few tokens

    def prefill(self, batch, kv, rows=None) -> torch.Tensor:
        return rows if rows is not None else batch.input_ids

    def extend(self, batch, kv, rows) -> torch.Tensor:
        return rows

    def decode(self, batch, kv) -> torch.Tensor:
        return batch.input_ids

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.table[: hidden.shape[0]]


def write_model_dir(directory: Path, tokenizer_dir: Path) -> Path:
    """A checkpoint directory for ``load_format="dummy"``: the tiny config, GPT-2's vocab.json and merges.txt."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(TINY_MODEL))
    for name in ("vocab.json", "merges.txt"):
        (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
    return directory


# what each step returns: ``LLM.generate``'s one final output per request, or a server stream's per-step deltas
OUTPUT_KINDS = {"final": RequestOutputKind.FINAL_ONLY, "stream": RequestOutputKind.DELTA}


def sampling(kind: str, max_tokens: int, output: str = "stream") -> SamplingParams:
    """``greedy`` or ``sampled`` (temperature 0.8, top-p 0.95: a chat server's defaults), never stopping early."""
    common = dict(max_tokens=max_tokens, ignore_eos=True, output_kind=OUTPUT_KINDS[output])
    if kind == "greedy":
        return SamplingParams(temperature=0.0, **common)
    return SamplingParams(temperature=0.8, top_p=0.95, **common)


def write_lora_dirs(directory: Path, count: int, rank: int = 16) -> list[LoRARequest]:
    """``count`` random PEFT adapters of the tiny model's linears."""
    from engine.config import ModelConfig
    from engine.lora import save_random_adapter

    config = ModelConfig(**TINY_MODEL)
    return [LoRARequest(f"lora{i}", i + 1, str(save_random_adapter(directory / f"lora{i}", config, rank)))
            for i in range(count)]  # fmt: skip


def decoding_engine(
    model_dir: Path,
    prompts: list[str],
    kind: str,
    output: str = "stream",
    vocab: int = HOST_VOCAB,
    max_tokens: int = 600,
    loras: list[LoRARequest] | None = None,
) -> LLMEngine:
    """An engine with every prompt admitted, prefilled and decoding: each ``step()`` from here is a decode step of
    ``len(prompts)`` sequences. ``loras``: prompt i runs under ``loras[i % (len + 1)]``, the last share on the base
    model."""
    engine = LLMEngine(
        model_dir,
        backend="torch",
        device="cpu",
        dtype="float32",
        load_format="dummy",
        max_num_seqs=max(len(prompts), 1),
        num_blocks=len(prompts) * 64 + 16,
        progress=False,
        enable_lora=bool(loras),
        max_loras=len(loras or [None]),
    )
    engine.runner.model = StubModel(vocab, len(prompts))  # a row per sequence: no prompt logprobs asked
    choices = [*loras, None] if loras else [None]
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, sampling(kind, max_tokens, output), lora_request=choices[i % len(choices)])
    while engine.scheduler.waiting or any(seq.num_uncomputed > 1 for seq in engine.scheduler.running):
        engine.step()
    engine.step()
    if len(engine.scheduler.running) != len(prompts):
        raise RuntimeError(f"{len(engine.scheduler.running)} of {len(prompts)} sequences are running")
    return engine
