"""``ModelRunner``: turns scheduled sequences into the model's tensors, runs a step, returns logits."""

from __future__ import annotations

import torch

from engine.cuda_graphs import StaticDecoder
from engine.kv_cache import BlockManager, KVCache
from engine.model import GPT2, DecodeBatch, PrefillBatch
from engine.sequence import Sequence


def _tensor(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


class ModelRunner:
    """Owns the model and its KV cache; every step is tensors in, fp32 logits out."""

    def __init__(
        self,
        model: GPT2,
        kv: KVCache,
        blocks: BlockManager,
        device: torch.device,
        static_decoder: StaticDecoder | None = None,
    ) -> None:
        self.model = model
        self.kv = kv
        self.blocks = blocks
        self.device = device
        self.static_decoder = static_decoder  # fixed-shape (CUDA-graph) decode; None: eager

    def pack(self, token_lists: list[list[int]], slot_lists: list[list[int]] | None = None) -> PrefillBatch:
        """Pack whole sequences (positions from 0) into one prefill batch; no slots: cache nothing."""
        ids = [t for tokens in token_lists for t in tokens]
        positions = [p for tokens in token_lists for p in range(len(tokens))]
        slots = [s for row in slot_lists for s in row] if slot_lists is not None else [-1] * len(ids)
        cu = [0]
        for tokens in token_lists:
            cu.append(cu[-1] + len(tokens))
        dev = self.device
        return PrefillBatch(
            input_ids=_tensor(ids, torch.int64, dev),
            positions=_tensor(positions, torch.int64, dev),
            cu_seqlens=_tensor(cu, torch.int32, dev),
            max_seqlen=max(len(t) for t in token_lists),
            slot_mapping=_tensor(slots, torch.int64, dev),
        )

    def decode_batch(self, seqs: list[Sequence]) -> DecodeBatch:
        """One token per sequence: its last token, at position ``num_cached``."""
        positions = [seq.num_cached for seq in seqs]
        width = max(len(seq.block_table) for seq in seqs)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs]
        dev = self.device
        return DecodeBatch(
            input_ids=_tensor([seq.last_token for seq in seqs], torch.int64, dev),
            positions=_tensor(positions, torch.int64, dev),
            slot_mapping=_tensor([self.blocks.slot(s, p) for s, p in zip(seqs, positions)], torch.int64, dev),
            block_tables=_tensor(tables, torch.int32, dev),
            context_lens=_tensor([p + 1 for p in positions], torch.int32, dev),
            max_context_len=max(positions) + 1,
        )

    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Cache every prompt's K/V; returns the logits of each sequence's last token, ``[B, V]``."""
        tokens = [seq.all_token_ids() for seq in seqs]
        slots = [[self.blocks.slot(seq, p) for p in range(len(t))] for seq, t in zip(seqs, tokens)]
        batch = self.pack(tokens, slots)
        last_rows = batch.cu_seqlens[1:].long() - 1
        hidden = self.model.prefill(batch, self.kv, rows=last_rows)
        for seq in seqs:
            seq.num_cached = seq.num_tokens
        return self.model.logits(hidden)

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each sequence's last token; returns next-token logits ``[B, V]``."""
        static = self.static_decoder
        if static is not None and static.bucket_size(len(seqs)) is not None:
            positions = [seq.num_cached for seq in seqs]
            logits = static.decode(
                [seq.last_token for seq in seqs],
                positions,
                [self.blocks.slot(s, p) for s, p in zip(seqs, positions)],
                [seq.block_table for seq in seqs],
            )
        else:
            logits = self.model.logits(self.model.decode(self.decode_batch(seqs), self.kv))
        for seq in seqs:
            seq.num_cached += 1
        return logits

    def hidden_states(self, token_lists: list[list[int]]) -> torch.Tensor:
        """Final hidden states of whole sequences, nothing cached (scoring, features): packed ``[T, D]``."""
        return self.model.prefill(self.pack(token_lists), self.kv)
