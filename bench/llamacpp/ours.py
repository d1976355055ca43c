"""Our prefill and decode rates on the CPU, for when ``bench/cpu_decode.py`` is not there to give them.

Same signature and keys as ``bench.cpu_decode.measure_decode``. Timed with ``LLM.generate`` on fresh random prompts
(prefix caching off, so no run reuses another's K/V): prefill = the time to the first token (``max_tokens=1``),
decode = ``batch * (new_tokens - 1) / (t(new_tokens) - t(1))``, each time the median of ``repeats`` runs after one
warm-up.
"""

from __future__ import annotations

import statistics
import time

import torch


def measure_decode(
    model, dtype: str, quantization: str | None, batch: int, prompt_tokens: int, new_tokens: int, repeats: int = 3
) -> dict:
    """``prefill_tok_s`` (prompt tokens per second, all ``batch`` prompts) and ``decode_tok_s`` (generated tokens
    per second after the first, over the batch) of the torch backend on the CPU for checkpoint ``model``."""
    from engine import LLM, SamplingParams

    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 to time decode steps, got {new_tokens}")
    llm = LLM(
        model,
        backend="torch",
        device="cpu",
        dtype=dtype,
        quantization=quantization,
        max_num_seqs=batch,
        enable_prefix_caching=False,
        progress=False,
    )
    vocab = llm.config.vocab_size

    def run(n: int) -> float:
        prompts = torch.randint(0, vocab - 1, (batch, prompt_tokens)).tolist()  # below <|endoftext|>
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == n for o in outputs)
        return elapsed

    run(2)  # warm-up: first-call allocations and dispatch caches
    t_first = statistics.median(run(1) for _ in range(repeats))
    t_all = statistics.median(run(new_tokens) for _ in range(repeats))
    decode = batch * (new_tokens - 1) / (t_all - t_first) if t_all > t_first else float("nan")
    return dict(prefill_tok_s=batch * prompt_tokens / t_first, decode_tok_s=decode)
