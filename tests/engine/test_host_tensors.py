"""The runner's list-to-tensor helpers: values, dtypes and padding as ``torch.tensor`` would give them."""

from __future__ import annotations

import random

import pytest
import torch

from engine.host_tensors import list_tensor, padded_rows


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.bool])
def test_list_tensor_is_torch_tensor(dtype):
    n = random.randint(1, 300)
    if dtype is torch.bool:
        values = [random.random() < 0.5 for _ in range(n)]
    elif dtype is torch.float32:
        values = [random.uniform(-1e3, 1e3) for _ in range(n)]
    else:
        values = [random.randrange(-(1 << 30), 1 << 30) for _ in range(n)]
    got = list_tensor(values, dtype, torch.device("cpu"))
    assert got.dtype == dtype and torch.equal(got, torch.tensor(values, dtype=dtype))
    assert list_tensor([], dtype, torch.device("cpu")).shape == (0,)


def test_padded_rows_pads_each_row_to_the_longest():
    rows = [[random.randrange(1 << 20) for _ in range(random.randint(0, 9))] for _ in range(random.randint(1, 50))]
    rows.append([random.randrange(1 << 20) for _ in range(10)])  # the longest
    random.shuffle(rows)
    pad = random.randint(-5, 5)
    got = padded_rows(rows, torch.int32, torch.device("cpu"), pad=pad)
    want = torch.tensor([row + [pad] * (10 - len(row)) for row in rows], dtype=torch.int32)
    assert torch.equal(got, want)
    assert padded_rows([], torch.int32, torch.device("cpu")).shape == (0, 0)
