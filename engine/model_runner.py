"""``ModelRunner``: turns a scheduled step into the model's tensors, runs it, returns the logits to sample.

A step takes one of three paths of the model:
  * every sequence feeds its last token: ``decode`` (the split-K decode kernel; fixed-size buckets replayed as CUDA
    graphs when a ``StaticDecoder`` is set), also when some feed drafts after it (speculative decoding), each draft
    a row of its own;
  * every sequence starts from its first token (fresh prompts, or their first chunks): ``prefill``, whose
    attention reads K/V straight from the QKV projection;
  * anything else (prompt chunks after cached context, mixed with decode tokens): ``extend``.

Requests that ask for ``prompt_logprobs`` also get the logits of every prompt row of their chunk; the runner turns
them into the request's prompt log-probabilities (of the model, before any logit processing, as vLLM's).
"""

from __future__ import annotations

import torch

from engine.block_manager import BlockManager
from engine.cuda_graphs import StaticDecoder
from engine.host_tensors import list_tensor, padded_rows
from engine.kv_cache import KVCache
from engine.lora import LoRARequest, LoRASlots
from engine.model import GPT2, DecodeBatch, ExtendBatch, PrefillBatch
from engine.sampling import token_logprobs
from engine.scheduler import SchedulerOutput
from engine.sequence import Request, Sequence


def _cumsum(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def decodes_first(counts: list[int]) -> list[int]:
    """The batch order :meth:`ModelRunner.extend_batch` wants: the one-token chunks (decode rows), then the others,
    each group in its given order."""
    return sorted(range(len(counts)), key=lambda i: counts[i] != 1)


class ModelRunner:
    """Owns the model and its KV cache; every step is scheduled sequences in, fp32 logits out."""

    def __init__(
        self,
        model: GPT2,
        kv: KVCache,
        blocks: BlockManager,
        device: torch.device,
        static_decoder: StaticDecoder | None = None,
        loras: LoRASlots | None = None,
    ) -> None:
        self.model = model
        self.kv = kv
        self.blocks = blocks
        self.device = device
        self.static_decoder = static_decoder  # fixed-shape (CUDA-graph) decode; None: eager
        self.loras = loras  # the LoRA adapters' device slots (enable_lora); None: the base model only

    def execute(self, step: SchedulerOutput) -> tuple[list[Sequence], torch.Tensor]:
        """Run one step (``num_computed`` not yet advanced); returns the sequences whose tokens are then all
        computed and their next-token logits ``[S, V]``, in that order (a sequence with drafts once per row it
        samples: its last token's, then each draft's)."""
        self.kv.copy_blocks(step.block_copies)
        if step.all_decodes or all(seq.num_uncomputed == n == 1 for seq, n in zip(step.seqs, step.num_tokens)):
            return list(step.seqs), self.decode(step.seqs)
        if all(seq.num_uncomputed == 1 for seq in step.seqs):  # decodes, some with drafts
            return self.decode_drafts(step.seqs)
        if all(seq.num_computed == 0 for seq in step.seqs):
            return self.prefill(step)
        return self.extend(step)

    # ------------------------------------------------------------------ the three paths
    def _slots(self, seq: Sequence, start: int, n: int) -> list[int]:
        return [self.blocks.slot(seq, p) for p in range(start, start + n)]

    def _tokens(self, seq: Sequence, n: int) -> list[int]:
        return seq.token_range(seq.num_computed, seq.num_computed + n)

    def _lora_rows(self, seqs: list[Sequence], counts: list[int]) -> list[int] | None:
        """The LoRA slot of each packed row (``counts[i]`` rows of ``seqs[i]``; -1: the base model), bringing the
        step's adapters to the device; None when no row has an adapter."""
        if self.loras is None:
            return None
        wanted = [seq.request.lora_request for seq in seqs if seq.request.lora_request is not None]
        if not wanted:
            return None
        where = self.loras.activate(wanted)
        slot = [-1 if seq.request.lora_request is None else where[seq.request.lora_request.lora_int_id] for seq in seqs]
        return [s for s, n in zip(slot, counts) for _ in range(n)]

    def _lora_tensor(self, seqs: list[Sequence], counts: list[int]) -> torch.Tensor | None:
        rows = self._lora_rows(seqs, counts)
        return None if rows is None else list_tensor(rows, torch.int64, self.device)

    def _rows_to_sample(
        self, step: SchedulerOutput, order: list[int]
    ) -> tuple[list[Sequence], torch.Tensor, list[tuple[Request, int]]]:
        """For sequences in batch ``order``: the sampling ones, then the packed rows whose logits to compute (each
        sampling sequence's last token, then the rows that give prompt logprobs), then the ``(request, target
        token)`` of each of those prompt rows, in order (see :meth:`_prompt_rows`). A sequence with drafts samples
        the rows of its last token and each draft: it is listed once per row."""
        ends = _cumsum([step.num_tokens[i] for i in order])[1:]
        picked = [(step.seqs[i], row) for i, end in zip(order, ends) if step.samples(i)
                  for row in range(end - 1 - len(step.seqs[i].draft_token_ids), end)]  # fmt: skip
        prompt = [row for i, end in zip(order, ends) for row in self._prompt_rows(step, i, end)]
        rows = [row for _, row in picked] + [row for row, _, _ in prompt]
        targets = [(request, token) for _, request, token in prompt]
        return [seq for seq, _ in picked], list_tensor(rows, torch.int64, self.device), targets

    def _prompt_rows(self, step: SchedulerOutput, i: int, end: int) -> list[tuple[int, Request, int]]:
        """``(packed row, request, target token)`` for each row of sequence ``i``'s chunk (packed rows ending at
        ``end``) whose next token is a prompt token its request still lacks the logprob of."""
        seq, n = step.seqs[i], step.num_tokens[i]
        request = seq.request
        if seq.params.prompt_logprobs is None:
            return []
        prompt, have = request.prompt_token_ids, len(request.prompt_logprobs)
        first = seq.num_computed  # position of the chunk's first row
        return [(end - n + p - first, request, prompt[p + 1])
                for p in range(max(first, have - 1), min(first + n, len(prompt) - 1))]  # fmt: skip

    def _record_prompt_logprobs(self, targets: list[tuple[Request, int]], logits: torch.Tensor) -> torch.Tensor:
        """Record the prompt logprobs of ``targets`` from the last ``len(targets)`` rows of ``logits``; return the
        rows before them (the sampling sequences')."""
        if not targets:
            return logits
        num_sampled = logits.shape[0] - len(targets)
        tokens = list_tensor([token for _, token in targets], torch.int64, self.device)
        num_top = [request.params.prompt_logprobs for request, _ in targets]
        _, entries = token_logprobs(logits[num_sampled:].log_softmax(-1), tokens, num_top)
        for (request, _), entry in zip(targets, entries):
            request.prompt_logprobs.append(entry)
        return logits[:num_sampled]

    def prefill(self, step: SchedulerOutput) -> tuple[list[Sequence], torch.Tensor]:
        """Every sequence starts at position 0: causal attention within the chunk, K/V stored on the way."""
        tokens = [self._tokens(seq, n) for seq, n in zip(step.seqs, step.num_tokens)]
        slots = [self._slots(seq, seq.num_computed, n) for seq, n in zip(step.seqs, step.num_tokens)]
        seqs, rows, targets = self._rows_to_sample(step, list(range(len(step.seqs))))
        batch = self.pack(tokens, slots)
        batch.lora_slots = self._lora_tensor(step.seqs, step.num_tokens)
        hidden = self.model.prefill(batch, self.kv, rows=rows)
        return seqs, self._record_prompt_logprobs(targets, self.model.logits(hidden))

    def extend(self, step: SchedulerOutput) -> tuple[list[Sequence], torch.Tensor]:
        """A mixed step: one-token sequences first (decode attention), then chunks over their cached context."""
        order = decodes_first(step.num_tokens)
        seqs = [step.seqs[i] for i in order]
        counts = [step.num_tokens[i] for i in order]
        batch = self.extend_batch(
            seqs, [seq.num_computed for seq in seqs], [self._tokens(s, n) for s, n in zip(seqs, counts)]
        )
        batch.lora_slots = self._lora_tensor(seqs, counts)
        sampled, rows, targets = self._rows_to_sample(step, order)
        logits = self.model.logits(self.model.extend(batch, self.kv, rows))
        return sampled, self._record_prompt_logprobs(targets, logits)

    def extend_batch(self, seqs: list[Sequence], starts: list[int], chunks: list[list[int]]) -> ExtendBatch:
        """``chunks[i]``, the tokens of ``seqs[i]`` from position ``starts[i]`` on, over what the cache holds before
        it; the one-token chunks come first (they run as decode rows)."""
        counts = [len(chunk) for chunk in chunks]
        nd = counts.count(1)
        assert counts[:nd] == [1] * nd, "one-token chunks go first"
        lens = [start + n for start, n in zip(starts, counts)]
        dev = self.device
        return ExtendBatch(
            input_ids=list_tensor([t for chunk in chunks for t in chunk], torch.int64, dev),
            positions=list_tensor(
                [p for start, n in zip(starts, counts) for p in range(start, start + n)], torch.int64, dev
            ),  # fmt: skip
            slot_mapping=list_tensor(
                [s for seq, start, n in zip(seqs, starts, counts) for s in self._slots(seq, start, n)], torch.int64, dev
            ),  # fmt: skip
            num_decodes=nd,
            block_tables=padded_rows([seq.block_table for seq in seqs], torch.int32, dev),
            seq_lens=list_tensor(lens, torch.int32, dev),
            max_decode_len=max(lens[:nd], default=0),
            chunk_cu_seqlens=list_tensor(_cumsum(counts[nd:]), torch.int32, dev),
            max_chunk_len=max(counts[nd:], default=0),
            max_seq_len=max(lens[nd:], default=0),
        )

    def last_row_logits(self, seqs: list[Sequence], starts: list[int], chunks: list[list[int]]) -> torch.Tensor:
        """Feed ``chunks[i]`` to ``seqs[i]`` from position ``starts[i]`` (K/V stored, attending to the cache before
        it); the logits of each chunk's last token, ``[len(seqs), V]`` in that order. No LoRA: a draft model's."""
        if all(len(chunk) == 1 for chunk in chunks):
            return self.decode(seqs, [chunk[0] for chunk in chunks], starts)
        order = decodes_first([len(chunk) for chunk in chunks])
        batch = self.extend_batch([seqs[i] for i in order], [starts[i] for i in order], [chunks[i] for i in order])
        ends = _cumsum([len(chunks[i]) for i in order])[1:]
        last = [0] * len(seqs)
        for i, end in zip(order, ends):
            last[i] = end - 1
        rows = list_tensor(last, torch.int64, self.device)
        return self.model.logits(self.model.extend(batch, self.kv, rows))

    def decode(self, seqs: list[Sequence], tokens: list[int] | None = None, positions: list[int] | None = None):
        """Feed each sequence's last token; returns next-token logits ``[B, V]``. With ``tokens`` and
        ``positions``: row ``i`` feeds ``tokens[i]`` at ``positions[i]`` of ``seqs[i]`` instead."""
        if positions is None:
            positions = [seq.num_computed for seq in seqs]
        if tokens is None:
            tokens = [seq.last_token for seq in seqs]
        slots = self.blocks.slots(seqs, positions)
        lora = self._lora_rows(seqs, [1] * len(seqs))
        static = self.static_decoder
        if static is not None and static.bucket_size(len(seqs)) is not None:
            return static.decode(tokens, positions, slots, [s.block_table for s in seqs], lora)
        batch = self.decode_batch(seqs, tokens, positions, slots)
        batch.lora_slots = None if lora is None else list_tensor(lora, torch.int64, self.device)
        return self.model.logits(self.model.decode(batch, self.kv))

    def decode_drafts(self, seqs: list[Sequence]) -> tuple[list[Sequence], torch.Tensor]:
        """Decoding sequences, some with drafts: each of a sequence's rows (its last token, then each draft) is a
        decode row of its own whose context ends at that row, which is causal attention over the chunk (every row's
        K/V is stored before any row attends). Returns the sequences once per row, and the rows' logits."""
        rows, tokens, positions = [], [], []
        for seq in seqs:
            fed = [seq.last_token, *seq.draft_token_ids]
            rows += [seq] * len(fed)
            tokens += fed
            positions += range(seq.num_computed, seq.num_computed + len(fed))
        return rows, self.decode(rows, tokens, positions)

    def decode_batch(
        self, seqs: list[Sequence], tokens: list[int], positions: list[int], slots: list[int]
    ) -> DecodeBatch:
        """One token per row: ``tokens[i]`` of ``seqs[i]``, at ``positions[i]``."""
        dev = self.device
        return DecodeBatch(
            input_ids=list_tensor(tokens, torch.int64, dev),
            positions=list_tensor(positions, torch.int64, dev),
            slot_mapping=list_tensor(slots, torch.int64, dev),
            block_tables=padded_rows([seq.block_table for seq in seqs], torch.int32, dev),
            context_lens=list_tensor([p + 1 for p in positions], torch.int32, dev),
            max_context_len=max(positions) + 1,
        )

    # ------------------------------------------------------------------ whole sequences, nothing cached
    def pack(self, token_lists: list[list[int]], slot_lists: list[list[int]] | None = None) -> PrefillBatch:
        """Pack whole sequences (positions from 0) into one prefill batch; no slots: cache nothing."""
        ids = [t for tokens in token_lists for t in tokens]
        positions = [p for tokens in token_lists for p in range(len(tokens))]
        slots = [s for row in slot_lists for s in row] if slot_lists is not None else [-1] * len(ids)
        dev = self.device
        return PrefillBatch(
            input_ids=list_tensor(ids, torch.int64, dev),
            positions=list_tensor(positions, torch.int64, dev),
            cu_seqlens=list_tensor(_cumsum([len(t) for t in token_lists]), torch.int32, dev),
            max_seqlen=max(len(t) for t in token_lists),
            slot_mapping=list_tensor(slots, torch.int64, dev),
        )

    def hidden_states(self, token_lists: list[list[int]], lora_request: LoRARequest | None = None) -> torch.Tensor:
        """Final hidden states of whole sequences, nothing cached (scoring, features): packed ``[T, D]``; under the
        LoRA adapter ``lora_request`` if given."""
        batch = self.pack(token_lists)
        if lora_request is not None:
            slot = self.loras.activate([lora_request])[lora_request.lora_int_id]
            batch.lora_slots = torch.full_like(batch.input_ids, slot)
        return self.model.prefill(batch, self.kv)
