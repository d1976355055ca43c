"""The paged KV cache: one pool of fixed-size blocks per layer (:mod:`engine.block_manager` hands them out).

A sequence's token ``t`` lives in block ``block_table[t // block_size]`` at offset ``t % block_size``, i.e. in
slot ``block_table[t // block_size] * block_size + t % block_size`` of the flattened pool (vLLM's layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig


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

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks ``src -> dst`` in every layer (copy-on-write of a shared, partly filled block)."""
        if not copies:
            return
        src, dst = (torch.tensor(ids, device=self.k.device) for ids in zip(*copies))
        for pool in (self.k, self.v):
            pool[:, dst] = pool[:, src]
