"""The paged KV cache: one pool of fixed-size blocks per layer, and the ``BlockManager`` that hands them out.

A sequence's token ``t`` lives in block ``block_table[t // block_size]`` at offset ``t % block_size``, i.e. in
slot ``block_table[t // block_size] * block_size + t % block_size`` of the flattened pool (vLLM's layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class KVCache:
    """Per-layer K and V pools, each ``[num_layers, num_blocks, block_size, n_head, head_dim]``."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layer * block_size * config.n_embd * elem

    @classmethod
    def allocate(
        cls, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> KVCache:
        shape = (config.n_layer, num_blocks, block_size, config.n_head, config.head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))


class BlockManager:
    """Free-list allocator over the block pool, with per-sequence block tables.

    A sequence is admitted only once blocks for every token it may ever hold are free, and they are taken at
    once, so a running batch never runs out of cache mid-generation (no preemption needed). ``allocate``
    grows a table to any length, so continuous batching can later allocate lazily with the same structure.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow ``seq.block_table`` so it can hold ``num_tokens`` tokens."""
        missing = self.blocks_needed(num_tokens) - len(seq.block_table)
        if missing > self.num_free:
            raise RuntimeError(f"KV cache exhausted: need {missing} blocks, {self.num_free} free")
        for _ in range(missing):
            seq.block_table.append(self.free_blocks.pop())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(reversed(seq.block_table))
        seq.block_table = []
        seq.num_cached = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
