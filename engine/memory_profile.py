"""What a step takes beyond the weights and the KV pool, measured before the pool is sized (vLLM's profile run).

Under ``gpu_memory_utilization`` the pool gets that fraction of the GPU less what is in use and less the peak of
the largest step the engine will schedule, so that step cannot run out of memory once the pool is allocated.
"""

from __future__ import annotations

import torch

from engine.kv_cache import KVCache
from engine.model import GPT2
from engine.model_runner import ModelRunner
from engine.sampling import Sampler
from engine.sampling_params import MAX_LOGPROBS, SamplingParams

# what a real step holds that the profile's does not: the host-built index tensors (rows to sample, targets of
# prompt logprobs) and the allocator's rounding of their sizes; KiBs against the logits' MiBs
PEAK_MARGIN = 0.02
# Triton's autotuner times a kernel met at a new shape (a new decode batch bucket, say) with a buffer of its own,
# 256 MiB that it writes to clear the L2 between timings: a step that tunes holds it beside its own tensors
TUNING_BUFFER_BYTES = 256 << 20
# the sampler's costliest path per row: temperature, top-p (a sort of the whole vocabulary), min-p, alternatives
_COSTLIEST = SamplingParams(temperature=1.0, top_p=0.9, min_p=0.01, logprobs=MAX_LOGPROBS)


def worst_case_tokens(num_tokens: int, max_model_len: int, vocab_size: int) -> list[list[int]]:
    """Random prompts of ``max_model_len`` tokens (the last one shorter), ``num_tokens`` in all."""
    lengths = [max_model_len] * (num_tokens // max_model_len) + [num_tokens % max_model_len]
    return [torch.randint(vocab_size, (n,)).tolist() for n in lengths if n]


def worst_case_step(model: GPT2, num_tokens: int, max_num_seqs: int, max_model_len: int) -> torch.Tensor:
    """Run the largest step the engine schedules, on random prompts (:func:`worst_case_tokens`, nothing cached):
    every row's logits, their log-probabilities and top ``MAX_LOGPROBS`` (``prompt_logprobs`` of every row), then,
    with those logits still held as the runner holds them, the sampler's costliest path over ``max_num_seqs`` of
    their rows. Returns the ``[num_tokens, V]`` logits (fp32, rows in prompt order)."""
    wte = model.w.wte
    tokens = worst_case_tokens(num_tokens, max_model_len, model.config.vocab_size)
    kv = KVCache.allocate(model.config, 1, 1, wte.dtype, wte.device)  # unpacked prompts store nothing (slot -1)
    hidden = ModelRunner(model, kv, None, wte.device).hidden_states(tokens)  # held, as the runner holds it
    logits = model.logits(hidden)
    logits.log_softmax(-1).topk(MAX_LOGPROBS, dim=-1)
    rows = min(max_num_seqs, num_tokens)
    _, logprobs = Sampler()(logits[:rows], [_COSTLIEST] * rows, [None] * rows)  # no penalty: logits stay as they are
    logprobs.topk(MAX_LOGPROBS, dim=-1)
    return logits


def step_peak_bytes(model: GPT2, num_tokens: int, max_num_seqs: int, max_model_len: int) -> int:
    """The most :func:`worst_case_step` holds at once on the CUDA device of ``model`` over what was allocated before
    it, plus ``PEAK_MARGIN`` of that and, on the triton backend, ``TUNING_BUFFER_BYTES``. Its memory goes back to the
    device afterwards (``torch.cuda.mem_get_info`` counts it free again) and the random generators are left as they
    were (a seeded engine draws what it would have)."""
    device = model.w.wte.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.random.fork_rng(devices=[device]):
        worst_case_step(model, num_tokens, max_num_seqs, max_model_len)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return int(peak * (1 + PEAK_MARGIN)) + (TUNING_BUFFER_BYTES if model.ops.name == "triton" else 0)
