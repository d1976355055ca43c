"""Speculative decoding with a draft model (vLLM's ``speculative_config={"model": "gpt2", ...}``, transformers'
assisted generation): a smaller GPT-2 of the same vocabulary guesses the next tokens, the target verifies them.

The draft runs on the same backend, dtype and device, with a paged KV cache of its own that mirrors the target's
block for block: it is indexed by the same block tables (a sequence's token ``t`` has its draft K/V in the slot
where its target K/V are), so blocks are allocated, shared and freed once for both. ``Sequence.draft_computed``
says how many of a sequence's tokens the draft cache holds: 0 at first and when the blocks are freed (preemption),
cut to ``num_computed`` when drafts are rejected and to the full blocks at a fork (the partly filled one is copied
for the target only). The prefix cache serves both: a cached block whose draft K/V were written too
(``Block.draft_filled``) counts for the draft as well, so a request extending a cached prompt has the draft compute
only what follows. A sequence whose draft cache lacks tokens the target computed (a prompt, cached blocks the draft
never filled) has the draft compute them when it next drafts; a full block it shares is then written again with the
same K/V.

Drafting happens after the scheduler has cut each sequence's drafts to the step's budget and given their rows
blocks (:meth:`DraftModelProposer.propose` only asks for ``num_speculative_tokens`` of them): the draft first
catches up on the tokens its cache lacks (the whole prompt at a sequence's first decode, then the last sampled
token, or two when every draft was accepted) in one pass that also gives the first draft, then runs one decode
step per further draft. Each draft is drawn as the target would draw the token there, under the request's own
sampling parameters (a greedy request's is the draft's argmax). A greedy request keeps the drafts up to the first
that is not the target's argmax; a sampled one runs rejection sampling (:meth:`DraftModelProposer.verify`), which
keeps each position's token distributed as the target's and accepts a draft whenever the two models agree on its
probability, where checking for equality with the target's own draw would land it only as often as that draw
picks it. Either way the output is distributed exactly as without speculation; a better draft makes more land.
"""

from __future__ import annotations

import torch

from engine.logits_processing import process_logits
from engine.model_runner import ModelRunner
from engine.race import row_argmax
from engine.sampling import SamplingBatch, draw_from, sampling_probs
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence

PENDING = -1  # a draft the scheduler counts but the draft model has not written yet


class DraftModelProposer:
    """Drafts from a draft model, run by its own :class:`ModelRunner` over its own KV cache; verifies sampled
    requests' drafts by rejection sampling."""

    def __init__(self, runner: ModelRunner, eos_token_id: int | None) -> None:
        self.runner = runner
        self.eos_token_id = eos_token_id  # what ``min_tokens`` holds back, as the sampler's
        self._draft_probs: dict[Sequence, list[torch.Tensor]] = {}  # a sampled sequence's q rows, this step's drafts

    def propose(self, seq: Sequence, num_drafts: int) -> list[int]:
        """Room for ``num_drafts`` drafts in the sequence's next step, written by :meth:`before_step`."""
        return [PENDING] * num_drafts

    def before_step(self, step: SchedulerOutput) -> None:
        """Write the drafts of the step's sequences that have room for them."""
        self._draft_probs = {}
        seqs = [seq for seq in step.seqs if seq.draft_token_ids]
        if seqs:
            self._draft(seqs)

    def _draft(self, seqs: list[Sequence]) -> None:
        counts = [len(seq.draft_token_ids) for seq in seqs]
        starts = [min(seq.draft_computed, seq.num_computed) for seq in seqs]
        chunks = [seq.token_range(start, seq.num_tokens) for seq, start in zip(seqs, starts)]
        drafts = [[token] for token in self._choose(seqs, self.runner.last_row_logits(seqs, starts, chunks))]
        for seq, start in zip(seqs, starts):
            self.runner.blocks.mark_draft_filled(seq, start, seq.num_tokens)
        for j in range(1, max(counts)):  # draft j + 1 of each sequence that wants that many
            live = [i for i, count in enumerate(counts) if count > j]
            logits = self.runner.decode([seqs[i] for i in live], [drafts[i][-1] for i in live],
                                        [seqs[i].num_computed + j for i in live])  # fmt: skip
            for i, token in zip(live, self._choose([seqs[i] for i in live], logits)):
                drafts[i].append(token)
        for seq, tokens in zip(seqs, drafts):
            seq.draft_token_ids = tokens
            seq.draft_computed = seq.num_computed + len(tokens)  # the last token and every draft but the last

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Each row's draft, drawn as the target would draw its token (the request's own sampling parameters; a
        greedy request's argmax); a sampled sequence keeps the distribution ``q`` it was drawn from."""
        batch = SamplingBatch.of([seq.params for seq in seqs], [None] * len(seqs), logits.shape[-1], logits.device)
        if batch.modifies_logits:
            process_logits(logits, batch.params, seqs, self.eos_token_id)
        if batch.temperatures is None:  # all greedy (most batches)
            return row_argmax(logits).tolist()
        probs, tokens = sampling_probs(logits, batch, draw=True)
        for i, seq in enumerate(seqs):
            if seq.params.temperature != 0.0:
                self._draft_probs.setdefault(seq, []).append(probs[i])
        return tokens.tolist()

    def verify(self, rows: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Rejection sampling (Leviathan et al. 2023; vLLM's rejection sampler) for the sampled sequences' drafts:
        ``rows`` lists each sequence once per row (its last token's, then each draft's), ``logits`` the rows'
        logits as the sampler processed them, ``tokens`` what the sampler drew from each row's distribution ``p``.
        Draft ``d`` of a row is accepted with probability ``min(1, p(d) / q(d))``; the first one rejected is
        replaced by a draw from ``max(p - q, 0)``, which never gives ``d``. So each position's token is distributed
        as ``p`` (what decoding without speculation draws), and a draft close to the target lands far more often
        than a draw from ``p`` would equal it. Rows past a rejection are not used; greedy sequences keep ``tokens``
        (a draft lands if it is the target's argmax)."""
        if not self._draft_probs:
            return tokens
        index, drafts, q_rows = [], [], []
        i = 0
        while i < len(rows):
            seq = rows[i]
            n = len(seq.draft_token_ids)
            if seq in self._draft_probs:
                index += range(i, i + n)
                drafts += seq.draft_token_ids
                q_rows += self._draft_probs[seq][:n]
            i += n + 1
        if not index:
            return tokens
        params = [rows[i].params for i in index]
        batch = SamplingBatch.of(params, [None] * len(index), logits.shape[-1], logits.device)
        p = sampling_probs(logits[index], batch)
        q = torch.stack(q_rows)
        d = torch.tensor(drafts, device=logits.device)[:, None]
        p_d, q_d = p.gather(1, d).squeeze(1), q.gather(1, d).squeeze(1)
        accepted = (torch.rand_like(q_d) * q_d < p_d).tolist()
        tokens = tokens.tolist()
        rejected = [k for k, ok in enumerate(accepted) if not ok]
        if rejected:
            residual = (p[rejected] - q[rejected]).clamp_(min=0)
            for k, token in zip(rejected, draw_from(residual).tolist()):
                tokens[index[k]] = token
        for k, ok in enumerate(accepted):
            if ok:
                tokens[index[k]] = drafts[k]
        return torch.tensor(tokens, device=logits.device)
