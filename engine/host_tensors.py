"""Python lists of numbers to tensors, fast: the runner builds a handful each step, from hundreds of sequences.

``torch.tensor(list)`` inspects every element (about 150 ns each on a server CPU); ``array.array`` packs the same
list in C, and ``torch.frombuffer`` wraps it without a copy (the tensor keeps the array alive), three to four times
faster. A step's block tables at 256 sequences are thousands of ints, so this is a visible part of the host's time.
"""

from __future__ import annotations

import array

import torch

_TYPECODES = {torch.int64: "q", torch.int32: "i", torch.float32: "f", torch.bool: "b"}


def list_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a 1-D ``dtype`` (int64, int32, float32 or bool) tensor on ``device``."""
    if not values:
        return torch.empty(0, dtype=dtype, device=device)
    host = torch.frombuffer(array.array(_TYPECODES[dtype], values), dtype=dtype)
    return host.to(device)


def padded_rows(rows: list[list[int]], dtype: torch.dtype, device: torch.device, pad: int = 0) -> torch.Tensor:
    """Rows of different lengths as a ``[len(rows), longest]`` tensor, each row padded with ``pad``."""
    width = max(map(len, rows), default=0)
    padding = [pad] * width
    flat: list[int] = []
    for row in rows:  # in-place list extends: a third faster than chaining padded copies
        flat += row
        flat += padding[len(row) :]
    return list_tensor(flat, dtype, device).view(len(rows), width)
