"""Decode at fixed batch sizes, replayed as CUDA graphs (gpt-fast's ``decode_one_token``, nano-vllm's
``capture_cudagraph``).

A decode step of GPT-2 Medium is ~200 small kernel launches; at small batch their launch and Python cost
exceeds the math. So each batch-size bucket gets static input buffers and one captured graph of
``decode -> ln_f -> LM head``. A batch of B sequences runs in the smallest bucket >= B: pad rows store nothing
(slot -1) and attend over nothing (context 0), and their logits are dropped. Every capture uses
``max_context_len`` = the engine's ``max_model_len`` (the model's ``n_positions`` unless lowered), so the kernels'
launch grids never depend on the step.

Without CUDA (or to test the padding on CPU) the same buckets run eagerly: ``capture=False``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from engine.host_tensors import list_tensor, padded_rows
from engine.kv_cache import KVCache, cdiv
from engine.model import GPT2, DecodeBatch


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to ``max_batch`` (vLLM's capture sizes)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


@dataclass
class _Bucket:
    batch: DecodeBatch  # static inputs, padded to the bucket size
    logits: torch.Tensor | None = None  # [bucket, V] fp32, the graph's output
    graph: torch.cuda.CUDAGraph | None = None


class StaticDecoder:
    """Runs decode steps in padded, fixed-shape buckets; captures each bucket as a CUDA graph on first use."""

    def __init__(
        self, model: GPT2, kv: KVCache, max_batch: int, device: torch.device, capture: bool, max_context: int = 0
    ) -> None:
        """``max_context``: the longest sequence decoded (0: the model's ``n_positions``)."""
        self.model = model
        self.kv = kv
        self.device = device
        self.capture = capture
        self.sizes = buckets(max_batch)
        self.max_context = max_context or model.config.n_positions
        self.max_blocks = cdiv(self.max_context, kv.block_size)
        self._buckets: dict[int, _Bucket] = {}

    def bucket_size(self, batch: int) -> int | None:
        return next((s for s in self.sizes if s >= batch), None)

    def _new_bucket(self, size: int) -> _Bucket:
        def full(shape, value, dtype):
            return torch.full(shape, value, dtype=dtype, device=self.device)

        batch = DecodeBatch(
            input_ids=full((size,), 0, torch.int64),
            positions=full((size,), 0, torch.int64),
            slot_mapping=full((size,), -1, torch.int64),  # pad rows: store nothing
            block_tables=full((size, self.max_blocks), 0, torch.int32),
            context_lens=full((size,), 0, torch.int32),  # pad rows: attend over nothing
            max_context_len=self.max_context,
            # with LoRA on, every bucket runs the adapters' path (pad rows and base rows: slot -1)
            lora_slots=full((size,), -1, torch.int64) if self.model.lora is not None else None,
        )
        bucket = _Bucket(batch)
        if self.capture:
            try:
                self._capture(bucket)
            except RuntimeError as e:  # e.g. an op that syncs: keep serving, eagerly, and say why
                warnings.warn(f"CUDA graph capture failed ({e}); decoding eagerly from now on", stacklevel=2)
                self.capture = False
                bucket.graph = bucket.logits = None
        return bucket

    def _run(self, batch: DecodeBatch) -> torch.Tensor:
        return self.model.logits(self.model.decode(batch, self.kv))

    def _capture(self, bucket: _Bucket) -> None:
        # Warm up on a side stream first: autotuning and lazy initialization must not happen inside capture.
        # The bucket's inputs are all padding here, so the warm-up writes nothing to the cache.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run(bucket.batch)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        bucket.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(bucket.graph):
            bucket.logits = self._run(bucket.batch)

    def decode(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        tables: list[list[int]],
        lora_slots: list[int] | None = None,
    ) -> torch.Tensor:
        """One decode step for ``len(input_ids)`` sequences; returns their logits ``[B, V]``. ``lora_slots``: each
        row's LoRA slot (None: none has an adapter)."""
        n = len(input_ids)
        size = self.bucket_size(n)
        if size is None:
            raise ValueError(f"decode batch of {n} exceeds the largest bucket {self.sizes[-1]}")
        if size not in self._buckets:
            self._buckets[size] = self._new_bucket(size)
        bucket = self._buckets[size]
        b = bucket.batch
        cpu = torch.device("cpu")
        rows = padded_rows(tables, torch.int32, cpu)
        b.input_ids[:n].copy_(list_tensor(input_ids, torch.int64, cpu))
        b.positions[:n].copy_(list_tensor(positions, torch.int64, cpu))
        b.slot_mapping[:n].copy_(list_tensor(slots, torch.int64, cpu))
        b.block_tables[:n, : rows.shape[1]].copy_(rows)
        b.context_lens[:n].copy_(list_tensor(positions, torch.int32, cpu) + 1)
        b.slot_mapping[n:].fill_(-1)  # rows a larger batch used before are padding again
        b.context_lens[n:].fill_(0)
        if b.lora_slots is not None:
            b.lora_slots.fill_(-1)
            if lora_slots is not None:
                b.lora_slots[:n].copy_(list_tensor(lora_slots, torch.int64, cpu))
        if bucket.graph is None:
            return self._run(b)[:n]
        bucket.graph.replay()
        return bucket.logits[:n]
