"""Speculative decoding with a draft model (vLLM's ``speculative_config={"model": "gpt2", ...}``, transformers'
assisted generation): a smaller GPT-2 of the same vocabulary guesses the next tokens, the target verifies them.

The draft runs on the same backend, dtype and device, with a paged KV cache of its own that mirrors the target's
block for block: it is indexed by the same block tables (a sequence's token ``t`` has its draft K/V in the slot
where its target K/V are), so blocks are allocated, shared and freed once for both. ``Sequence.draft_computed``
says how many of a sequence's tokens the draft cache holds: 0 at first and when the blocks are freed (preemption),
cut to ``num_computed`` when drafts are rejected and to the full blocks at a fork (the partly filled one is copied
for the target only). A sequence whose draft cache lacks tokens the target computed (a prompt, blocks the prefix
cache served) has the draft compute them when it next drafts; a full block it shares is then written again with
the same K/V.

Drafting happens after the scheduler has cut each sequence's drafts to the step's budget and given their rows
blocks (:meth:`DraftModelProposer.propose` only asks for ``num_speculative_tokens`` of them): the draft first
catches up on the tokens its cache lacks (the whole prompt at a sequence's first decode, then the last sampled
token, or two when every draft was accepted) in one pass that also gives the first draft, then runs one decode
step per further draft. Drafts are the draft model's greedy tokens, and the target checks them as it checks the
n-gram lookup's (:func:`engine.speculative.accepted_length`), so what the target generates is exactly what it
generates without speculation; a better draft model only makes more of the drafts land.
"""

from __future__ import annotations

from engine.model_runner import ModelRunner
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence

PENDING = -1  # a draft the scheduler counts but the draft model has not written yet


class DraftModelProposer:
    """Drafts from a draft model, run by its own :class:`ModelRunner` over its own KV cache."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def propose(self, seq: Sequence, num_drafts: int) -> list[int]:
        """Room for ``num_drafts`` drafts in the sequence's next step, written by :meth:`before_step`."""
        return [PENDING] * num_drafts

    def before_step(self, step: SchedulerOutput) -> None:
        """Write the drafts of the step's sequences that have room for them."""
        seqs = [seq for seq in step.seqs if seq.draft_token_ids]
        if seqs:
            self._draft(seqs)

    def _draft(self, seqs: list[Sequence]) -> None:
        counts = [len(seq.draft_token_ids) for seq in seqs]
        starts = [min(seq.draft_computed, seq.num_computed) for seq in seqs]
        chunks = [seq.all_token_ids()[start:] for seq, start in zip(seqs, starts)]
        drafts = [[token] for token in self.runner.last_row_logits(seqs, starts, chunks).argmax(-1).tolist()]
        for j in range(1, max(counts)):  # draft j + 1 of each sequence that wants that many
            live = [i for i, count in enumerate(counts) if count > j]
            logits = self.runner.decode([seqs[i] for i in live], [drafts[i][-1] for i in live],
                                        [seqs[i].num_computed + j for i in live])  # fmt: skip
            for i, token in zip(live, logits.argmax(-1).tolist()):
                drafts[i].append(token)
        for seq, tokens in zip(seqs, drafts):
            seq.draft_token_ids = tokens
            seq.draft_computed = seq.num_computed + len(tokens)  # the last token and every draft but the last
