"""``Scheduler``: which sequences compute how many tokens in the next step.

Each step has a budget of ``max_num_batched_tokens`` tokens (vLLM v1's policy, with chunked prefill always on):
  1. running sequences that decode (one token each) go first, in the order they were admitted;
  2. running sequences part way through their prompt get their next chunk from what the budget has left;
  3. then waiting sequences are admitted first come, first served, each with a chunk of the rest of the budget,
     as long as their first chunk's blocks are free and ``max_num_seqs`` is not reached; the prefix cache serves
     what it can of their tokens first.
Blocks are taken as tokens need them. When a running sequence cannot get a block, the newest running sequence
is preempted by recompute: it gives its blocks back and goes to the front of the queue, to recompute its prompt and
generated tokens later (hitting its own cached blocks) and continue where it was. A step that preempted admits
nobody new. A request's ``n`` samples run as one sequence until its prompt is computed, then fork.

With ``policy="priority"`` (vLLM's ``scheduling_policy``), the queue is ordered by each request's ``priority``
(lower first), then arrival, and the sequence preempted is the running one of the lowest priority (the newest of
those) instead of the newest.

With LoRA adapters (``max_loras``), the running sequences use at most ``max_loras`` distinct adapters: a waiting
sequence whose adapter would be one too many waits, and those behind it are admitted past it.

A decoding sequence with drafts (speculative decoding) computes its token and as many of its drafts as the budget
and the free blocks allow, leaving a block for each running sequence whose next token needs one: a draft never
makes the scheduler preempt.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """One step: ``seqs[i]`` computes its next ``num_tokens[i]`` tokens; block copies run first."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    num_preempted: int = 0
    # every sequence computes its one uncomputed token (a pure decode step): the scheduler knows it for free, the
    # runner would ask each sequence again; False when not known
    all_decodes: bool = False

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def samples(self, i: int) -> bool:
        """Whether ``seqs[i]`` has all its tokens computed after this step (its last row's logits are sampled, and
        those of its drafts' rows before it)."""
        seq = self.seqs[i]
        return self.num_tokens[i] == seq.num_uncomputed + len(seq.draft_token_ids)


POLICIES = ("fcfs", "priority")


def _rank(seq: Sequence) -> tuple[int, int]:
    """A sequence's place under the priority policy: its request's priority, then its arrival (ids grow with it)."""
    return seq.request.priority, seq.seq_id


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: str = "fcfs",
        max_loras: int | None = None,
    ) -> None:
        self.blocks = blocks
        self.max_loras = max_loras  # distinct LoRA adapters the running sequences may use (None: LoRA off)
        self.by_priority = policy == "priority"
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in the order they were admitted: the last one is preempted first
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, tokens served from it

    def add(self, seq: Sequence) -> None:
        if self.by_priority:
            self._queue(seq)
        else:
            self.waiting.append(seq)

    def _queue(self, seq: Sequence) -> None:
        """Into the waiting queue in priority order (a new or a preempted sequence)."""
        rank = _rank(seq)
        at = next((i for i, other in enumerate(self.waiting) if _rank(other) > rank), len(self.waiting))
        self.waiting.insert(at, seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if not self._schedule_decodes(out):
            self._schedule_running(out)
        if self.waiting and not out.num_preempted:
            self._admit(out, self.max_num_batched_tokens - out.total_tokens)
        return out

    def _schedule_decodes(self, out: SchedulerOutput) -> bool:
        """Most steps, in one pass: every running sequence decodes one token, and the pool has a block for each one
        whose token starts a block or lands in a shared one, so nobody is preempted. False, ``out`` untouched,
        when that is not so."""
        running = self.running
        if not running or len(running) > self.max_num_batched_tokens:
            return False
        for seq in running:  # num_uncomputed == 1, without two property calls per sequence
            if len(seq.request.prompt_token_ids) + len(seq.output_token_ids) - seq.num_computed != 1:
                return False
            if seq.draft_token_ids:
                return False
        lacking = self.blocks.lacking_next_slot(running)  # about one sequence in 16 at each step
        if len(lacking) > self.blocks.num_free:
            return False
        for seq in lacking:
            out.block_copies += self.blocks.append(seq, seq.num_computed + 1)
        bs = self.blocks.block_size
        for seq in running:
            if (seq.num_computed + 1) // bs > len(seq.block_hashes):  # the token fills a block: register it
                self.blocks.register_full_blocks(seq, seq.num_computed + 1)
        out.seqs, out.num_tokens, out.all_decodes = list(running), [1] * len(running), True
        return True

    def _schedule_running(self, out: SchedulerOutput) -> None:
        """Running sequences in the general case: decodes first, then prompt chunks from the budget left, taking
        blocks as they are needed and preempting the newest sequences when there are none."""
        budget = self.max_num_batched_tokens
        uncomputed = [seq.num_uncomputed for seq in self.running]
        out.all_decodes = uncomputed.count(1) == len(uncomputed)  # the sequences preempted below leave it true
        todo = list(zip(self.running, uncomputed))
        if not out.all_decodes:  # decodes first, each group in admission order (a stable sort)
            todo.sort(key=lambda item: item[1] != 1)
        lacking = None  # the running sequences whose next token needs a block, once a sequence has drafts
        for seq, uncomputed in todo:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted for an earlier one this step
                continue
            n = min(uncomputed, budget)
            if seq.draft_token_ids:
                lacking = set(self.blocks.lacking_next_slot(self.running)) if lacking is None else lacking
                n = self._fit_drafts(seq, budget, len(lacking) - (seq in lacking))
                out.all_decodes = out.all_decodes and n == 1
            preempted = out.num_preempted
            if self._reserve(seq, n, out):
                out.seqs.append(seq)
                out.num_tokens.append(n)
                budget -= n
                if lacking:
                    lacking.discard(seq)  # it holds its next slot now
            if out.num_preempted != preempted:  # sequences scheduled earlier may have been taken back
                budget = self.max_num_batched_tokens - out.total_tokens

    def _fit_drafts(self, seq: Sequence, budget: int, keep_free: int) -> int:
        """Cut a decoding sequence's drafts to what the budget holds and the free blocks hold beyond ``keep_free``;
        the tokens it computes: its last one and those drafts."""
        drafts = seq.draft_token_ids[: budget - 1]
        while drafts and not self.blocks.can_append(seq, seq.num_computed + 1 + len(drafts), keep_free):
            drafts.pop()
        seq.draft_token_ids = drafts
        return 1 + len(drafts)

    def _reserve(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Blocks for ``seq``'s next ``n`` tokens, preempting the newest running sequences (the lowest-priority ones
        under the priority policy) until they fit; False when ``seq`` itself had to go."""
        target = seq.num_computed + n
        if not self.blocks.holds(seq, target):  # most decode steps write into a block the sequence already owns
            while not self.blocks.can_append(seq, target):
                victim = max(self.running, key=_rank) if self.by_priority else self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    return False
            out.block_copies += self.blocks.append(seq, target)
        self.blocks.register_full_blocks(seq, target)
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        if seq in out.seqs:  # scheduled earlier this step: take it back, with any copy into its blocks
            i = out.seqs.index(seq)
            del out.seqs[i], out.num_tokens[i]
            out.block_copies = [(src, dst) for src, dst in out.block_copies if dst not in seq.block_table]
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.draft_token_ids = []
        seq.status = SequenceStatus.WAITING
        if self.by_priority:
            self._queue(seq)
        else:
            self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.num_preempted += 1

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        # running sequences, and the samples their requests will fork once their prompts are computed
        seats = len(self.running) + sum(seq.request.num_pending_forks for seq in self.running if seq.params.n > 1)
        loras = self._running_loras()
        skipped = []  # waiting for a LoRA slot, in queue order
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            lora = seq.request.lora_request
            if lora is not None and lora.lora_int_id not in loras and len(loras) >= (self.max_loras or 0):
                skipped.append(self.waiting.popleft())
                continue
            wanted = 1 + seq.request.num_pending_forks
            if seats + wanted > self.max_num_seqs:
                break
            tokens = seq.all_token_ids()
            taken = self._take_blocks(seq, tokens, budget, out)
            if taken is None:
                break
            cached, n = taken
            self.waiting.popleft()
            self.blocks.register_full_blocks(seq, cached + n)  # later admissions in this step may hit them
            self.prefix_cache_queries += len(tokens)
            self.prefix_cache_hits += cached
            request = seq.request
            if request.num_cached_tokens is None:
                request.num_cached_tokens = cached
                request.metrics = replace(request.metrics, first_scheduled_time=time.time())
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_tokens.append(n)
            out.all_decodes = False
            budget -= n
            seats += wanted
            if lora is not None:
                loras.add(lora.lora_int_id)
        self.waiting.extendleft(reversed(skipped))

    def _running_loras(self) -> set[int]:
        """The ``lora_int_id`` s of the running sequences' adapters."""
        if self.max_loras is None:
            return set()
        return {seq.request.lora_request.lora_int_id for seq in self.running if seq.request.lora_request is not None}

    def _take_blocks(
        self, seq: Sequence, tokens: list[int], budget: int, out: SchedulerOutput
    ) -> tuple[int, int] | None:
        """Blocks for a waiting sequence's first chunk; ``(tokens already cached, chunk length)``, or None when the
        pool cannot hold it. A sequence forked from one that computed its prefix (beam search) holds that one's
        blocks already; any other reuses the longest prefix the cache has."""
        if seq.block_table:
            cached = seq.num_computed
            n = min(len(tokens) - cached, budget)
            if not self.blocks.can_append(seq, cached + n):
                return None
            out.block_copies += self.blocks.append(seq, cached + n)
            return cached, n
        hits, hashes = self.blocks.match_prefix(self._cacheable(seq, tokens), seq.request.cache_root)
        cached = len(hits) * self.blocks.block_size
        n = min(len(tokens) - cached, budget)
        if not self.blocks.can_admit(hits, cached + n):
            return None
        self.blocks.admit(seq, hits, hashes, cached + n)
        return cached, n

    @staticmethod
    def _cacheable(seq: Sequence, tokens: list[int]) -> list[int]:
        """The tokens the prefix cache may serve: all of them, unless the request still needs prompt logprobs,
        whose rows must be computed (a cached token has no logits): then only those before the first such row."""
        request = seq.request
        owed = len(request.prompt_logprobs)  # the row of position owed - 1 gives the next logprob
        if seq.params.prompt_logprobs is None or owed >= len(request.prompt_token_ids):
            return tokens
        return tokens[:owed]

    # ------------------------------------------------------------------ after the step
    def step_done(self, out: SchedulerOutput) -> None:
        """The step's tokens are in the cache."""
        for seq, n in zip(out.seqs, out.num_tokens):
            seq.num_computed += n

    def fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """Start ``children`` from ``parent``'s computed prompt, sharing its blocks."""
        for child in children:
            self.blocks.fork(parent, child)
            child.status = SequenceStatus.RUNNING
            self.running.append(child)

    def finish(self, seq: Sequence, keep_blocks: bool = False) -> None:
        """Drop a sequence that finished (or was aborted) and free its blocks, unless ``keep_blocks`` (the caller
        frees them later)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not keep_blocks:
            self.blocks.free(seq)
