"""``Scheduler``: decides which sequences run in each step.

Prefill first (nano-vllm's policy): while sequences wait and their worst-case cache fits, admit them into
one prefill step, up to ``max_num_seqs`` running and ``max_num_batched_tokens`` per prefill; otherwise run
one decode step over everything running. Admission reserves every block a sequence may ever need, so a
running batch can't run out of cache. Finished sequences free their blocks at once, so new ones join
while others are still decoding.
"""

from __future__ import annotations

from collections import deque

from engine.kv_cache import BlockManager
from engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns ``(sequences, is_prefill)`` for the next step."""
        admitted: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            seq = self.waiting[0]
            if admitted and tokens + seq.num_tokens > self.max_num_batched_tokens:
                break
            if not self.blocks.can_allocate(seq, seq.max_total_tokens):
                break
            self.blocks.allocate(seq, seq.max_total_tokens)
            seq.status = SequenceStatus.RUNNING
            admitted.append(self.waiting.popleft())
            tokens += seq.num_tokens
        if admitted:
            self.running.extend(admitted)
            return admitted, True
        if not self.running:
            # every request was checked against the whole pool on entry, so an empty pool always admits one
            raise RuntimeError("scheduler stalled: waiting sequences but none fits in an empty KV cache")
        return list(self.running), False

    def finish(self, seq: Sequence) -> None:
        """Drop a finished sequence and free its blocks."""
        self.running.remove(seq)
        self.blocks.free(seq)
