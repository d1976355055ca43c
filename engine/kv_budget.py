"""How many bytes the KV pool gets: ``kv_cache_memory``, or vLLM's ``gpu_memory_utilization``, or the defaults.

Under ``gpu_memory_utilization`` the pool gets that fraction of the GPU less what is in use and less the peak of
the largest step the engine will schedule, measured before the pool is sized (vLLM's profile run), so that step
cannot run out of memory once the pool is allocated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.kv_cache import KVCache
from engine.model import GPT2
from engine.model_runner import ModelRunner
from engine.sampling import Sampler
from engine.sampling_params import MAX_LOGPROBS, SamplingParams

CPU_KV_CACHE_BYTES = 4 << 30  # default KV pool on CPU (vLLM's CPU backend default)
GPU_KV_CACHE_FRACTION = 0.5  # default on CUDA: of the device memory free after loading the weights
# what a real step holds that the profile's does not: the host-built index tensors (rows to sample, targets of
# prompt logprobs) and the allocator's rounding of their sizes; KiBs against the logits' MiBs
PEAK_MARGIN = 0.02
# Triton's autotuner times a kernel met at a new shape (a new decode batch bucket, say) with a buffer of its own,
# 256 MiB that it writes to clear the L2 between timings: a step that tunes holds it beside its own tensors
TUNING_BUFFER_BYTES = 256 << 20
# the sampler's costliest path per row: temperature, top-p (a sort of the whole vocabulary), min-p, alternatives
_COSTLIEST = SamplingParams(temperature=1.0, top_p=0.9, min_p=0.01, logprobs=MAX_LOGPROBS)


def kv_budget(
    device: torch.device,
    kv_cache_memory: int | None,
    gpu_memory_utilization: float | None,
    step_bytes: Callable[[], int],
) -> int:
    """Bytes for the KV pool (``num_blocks`` aside): ``kv_cache_memory``, or ``gpu_memory_utilization``'s share of a
    GPU less what ``step_bytes()`` measures, or by default half the GPU's free memory (4 GiB on CPU)."""
    util = gpu_memory_utilization
    if util is None:
        if kv_cache_memory is not None:
            return kv_cache_memory
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0] * GPU_KV_CACHE_FRACTION)
        return CPU_KV_CACHE_BYTES
    if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0.0 < util <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be a fraction in (0, 1], got {util!r}")
    if kv_cache_memory is not None:
        raise ValueError("set kv_cache_memory or gpu_memory_utilization, not both")
    if device.type != "cuda":
        raise ValueError(f"gpu_memory_utilization sizes a CUDA device's pool; on {device} use kv_cache_memory")
    step = step_bytes()  # first: its memory is free again when the device is asked
    free, total = torch.cuda.mem_get_info(device)
    budget = kv_budget_on_gpu(free, total, util, step)
    if budget <= 0:
        raise ValueError(f"gpu_memory_utilization={util} leaves nothing for the KV cache: "
                         f"{(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB are in use already and the largest "
                         f"step needs {step / 2**30:.2f} GiB more (lower max_num_batched_tokens, or raise the "
                         "fraction)")  # fmt: skip
    return budget


def kv_budget_on_gpu(free: int, total: int, utilization: float, step_bytes: int = 0) -> int:
    """The KV pool's bytes under vLLM's ``gpu_memory_utilization``: that fraction of the device's memory less what
    is in use already (the weights, and any other process) and less ``step_bytes``, the peak of the largest step
    (:func:`step_peak_bytes`), which must still fit once the pool is allocated."""
    return int(utilization * total) - (total - free) - step_bytes


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


def worst_case_tokens(num_tokens: int, max_model_len: int, vocab_size: int) -> list[list[int]]:
    """Random prompts of ``max_model_len`` tokens (the last one shorter), ``num_tokens`` in all."""
    lengths = [max_model_len] * (num_tokens // max_model_len) + [num_tokens % max_model_len]
    return [torch.randint(vocab_size, (n,)).tolist() for n in lengths if n]
