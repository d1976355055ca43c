"""End to end, for ``gpu_check``: greedy decode tokens/s of the engine with the Triton backend (CUDA graphs, and
eager, and with n-gram speculation, and with every prompt under a LoRA adapter) against the same engine with the
torch backend and transformers' ``generate``, on random GPT-2 weights.

Validated first: the prompts' log-probs through each engine (``score``) against transformers in float32, within
twice the error of transformers itself in the benchmark dtype (for the LoRA engine: against PEFT's model, within
twice PEFT's own error in that dtype). A system that fails is not timed. The speculating
engine's greedy tokens are compared with the plain one's too (``tokens_agree``: the share of prompts whose tokens
are the same; a near-tie may flip between the two batch shapes), and its row records the share of its drafts
accepted: random weights loop, so this is more than real text gives.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field

import torch

from bench.bench_decode import add_adapters, build, decode_rate, ours, theirs
from bench.harness import dtype_name, rel_err

ENGINES = {  # label -> LLM arguments
    "triton": dict(backend="triton"),  # CUDA-graph decode on a GPU
    "triton-eager": dict(backend="triton", enforce_eager=True),
    "torch": dict(backend="torch"),  # cuBLAS + SDPA, eager (not capturable)
    "triton-spec": dict(backend="triton", speculative_config={"num_speculative_tokens": 4}),
    "triton-lora": dict(backend="triton", enable_lora=True, max_lora_rank=16),  # every prompt under one adapter
}
LORA_RANK = 16
# (ours, peer): the shipped engine against both peers, both eager engines against each other, speculation and LoRA
PAIRS = (("triton", "torch"), ("triton", "transformers"), ("triton-eager", "torch"), ("triton-spec", "triton"),
         ("triton-lora", "triton"))  # fmt: skip


@dataclass
class EngineSizes:
    model: dict = field(default_factory=lambda: dict(n_embd=1024, n_layer=24, n_head=16))  # gpt2-medium
    batch: tuple[int, ...] = (1, 32)
    prompt: int = 64
    new_tokens: int = 64
    repeats: int = 3

    @classmethod
    def tiny(cls) -> EngineSizes:
        return cls(dict(n_embd=64, n_layer=2, n_head=1, n_positions=64, vocab_size=500), (1, 2), 5, 3, 1)


def engine_rows(device: torch.device, dtype: torch.dtype, s: EngineSizes, deadline: float) -> list[dict]:
    """One row per batch size and pair of systems: tokens/s of each, the speedup, the log-prob errors."""
    with tempfile.TemporaryDirectory() as adapter_dir:  # the LoRA engine reads it at its first request
        return _engine_rows(device, dtype, s, deadline, adapter_dir)


def _engine_rows(device: torch.device, dtype: torch.dtype, s: EngineSizes, deadline: float, adapter_dir: str):
    vocab = s.model.get("vocab_size", 50257)
    hf32, llms = build(s.model, str(device), dtype_name(dtype), ENGINES, max(s.batch))
    ids = torch.randint(0, vocab, (max(s.batch), s.prompt)).tolist()
    try:
        peft32, loras = add_adapters(copy.deepcopy(hf32), LORA_RANK, adapter_dir)
        lora = loras[0]
    except ImportError as e:  # the LoRA engine's reference is PEFT's model: without peft it is not run
        print(f"  engine   triton-lora skipped: {e}", flush=True)
        peft32 = lora = None
        del llms["triton-lora"]
    hf = copy.deepcopy(hf32).to(dtype)
    errs, tols = validate(llms, {"transformers": (hf32, hf), "triton-lora": (peft32, lora)}, ids, dtype)
    del hf32, peft32
    gens = {label: ours(llm) for label, llm in llms.items()} | {"transformers": theirs(hf)}
    if lora is not None:
        gens["triton-lora"] = ours(llms["triton-lora"], [lora])
    rows = []
    for bsz in s.batch:
        rates = {}
        for label, fn in gens.items():
            if time.monotonic() < deadline and errs[label] <= tols[label]:
                fn(ids[:bsz], 2)  # warm-up: autotuning, CUDA-graph capture of this batch's bucket
                rates[label] = decode_rate(fn, ids[:bsz], s.new_tokens, s.repeats)
        for mine, peer in (pair for pair in PAIRS if set(pair) <= set(gens)):
            rows.append(pair_row(bsz, mine, peer, errs, tols[mine], rates))
            if mine == "triton-spec" and "triton-spec" in rates:
                rows[-1].update(speculation(gens["triton-spec"], gens["triton"], llms["triton-spec"], ids[:bsz], s))
    return rows


def validate(llms: dict, references: dict, ids: list[list[int]], dtype: torch.dtype) -> tuple[dict, dict]:
    """Each system's prompt log-prob error against its float32 reference, and its tolerance: twice the error of the
    reference itself run in ``dtype``. ``references``: ``"transformers"`` (the base model) and ``"triton-lora"``
    (PEFT's model, and the adapter's request) as ``(float32 model, model or request)``."""

    def hf_logprobs(model) -> torch.Tensor:
        x = torch.tensor(ids, device=model.device)
        with torch.inference_mode():
            logp = model(x).logits[:, :-1].double().log_softmax(-1)
        return logp.gather(2, x[:, 1:, None]).flatten().cpu()

    def our_logprobs(llm, lora_request=None) -> torch.Tensor:
        return torch.tensor([v for o in llm.score(ids, lora_request=lora_request) for v in o.logprobs])

    hf32, hf = references["transformers"]
    ref = hf_logprobs(hf32)
    errs = {"transformers": rel_err(hf_logprobs(hf), ref)}
    tols = dict.fromkeys([*llms, "transformers"], max(2 * errs["transformers"], 1e-6))
    for label, llm in llms.items():
        if label != "triton-lora":
            errs[label] = rel_err(our_logprobs(llm), ref)
    if "triton-lora" in llms:
        peft32, lora = references["triton-lora"]
        ref_lora = hf_logprobs(peft32)
        tols["triton-lora"] = max(2 * rel_err(hf_logprobs(copy.deepcopy(peft32).to(dtype)), ref_lora), 1e-6)
        errs["triton-lora"] = rel_err(our_logprobs(llms["triton-lora"], lora), ref_lora)
    return errs, tols


def speculation(spec, plain, llm, ids: list[list[int]], s: EngineSizes) -> dict:
    """The speculating engine's agreement with the plain one on greedy tokens, and its drafts' acceptance."""
    agree = sum(a == b for a, b in zip(spec(ids, s.new_tokens), plain(ids, s.new_tokens))) / len(ids)
    accepted = llm.llm_engine.get_stats().spec_decode_acceptance_rate
    print(f"  engine   speculation: tokens agree for {agree:.0%} of prompts, {accepted:.0%} of drafts accepted")
    return dict(tokens_agree=agree, spec_acceptance=accepted)


def pair_row(bsz: int, mine: str, peer: str, errs: dict, tol: float, rates: dict) -> dict:
    row = dict(section="engine", name=f"decode B={bsz} {mine} vs {peer}", batch=bsz, rel_err=errs[mine], tol=tol,
               peer_rel_err=errs[peer])  # fmt: skip
    if not errs[mine] <= tol:
        row.update(status="FAIL", reason=f"log-prob rel err {errs[mine]:.3g} > tol {tol:.3g}")
    elif mine not in rates or peer not in rates:
        row.update(status="SKIP", reason="time budget spent, or the peer failed validation")
    elif not rates[mine] > 0 or not rates[peer] > 0:  # nan: generating N tokens took no longer than 1
        row.update(status="SKIP", reason="decode time lost in timing noise (too few new tokens?)")
    else:
        t_ours, t_peer = bsz / rates[mine], bsz / rates[peer]  # seconds per decode step
        row.update(status="OK", ours_tok_s=rates[mine], peer_tok_s=rates[peer], speedup=t_peer / t_ours)
        row.update(ours_ms=1e3 * t_ours, peer_ms=1e3 * t_peer, method="wallclock, greedy generate")
    result = (f"{rates[mine]:8.0f} vs {rates[peer]:8.0f} tok/s  x{row['speedup']:.2f}" if row["status"] == "OK"
              else row["status"] + " " + row["reason"])  # fmt: skip
    print(f"  engine   {row['name']:40s} {result}  err {errs[mine]:.1e} (tol {tol:.1e})", flush=True)
    return row
