"""Batched LoRA's shrink against a row-by-row float64 reference: every row gets its own slot's A, other slots'
columns and rows of slot -1 are zeros, tiles whose rows use none of a slot still write it."""

from __future__ import annotations

import pytest
import torch

from kernels.lora import lora_shrink, lora_shrink_ref
from kernels.specs.lora import compile_specs
from tests.helpers import DEVICE, rel_err

DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)]


def shrink_case(M: int, S: int, R: int, K: int, dtype: torch.dtype):
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    lora_a = (torch.randn(S, R, K, device=DEVICE) / K**0.5).to(dtype)
    slots = torch.randint(-1, S, (M,), device=DEVICE)
    slots[torch.randint(0, M, (1,))] = torch.randint(0, S, (1,)).item()  # at least one row with an adapter
    return x, lora_a, slots


@pytest.mark.parametrize("M, S, R, K", [(1, 1, 16, 64), (7, 3, 8, 96), (33, 2, 40, 64), (70, 4, 16, 128)])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_each_row_gets_its_own_slot(M, S, R, K, dtype, tol):
    x, lora_a, slots = shrink_case(M, S, R, K, dtype)
    out = torch.full((M, S * R), float("nan"), dtype=dtype, device=DEVICE)
    u = lora_shrink(x, lora_a, slots, out=out)
    assert u is out
    ref = lora_shrink_ref(x, lora_a, slots)
    assert rel_err(u, ref) < tol
    columns = torch.arange(S * R, device=DEVICE) // R
    others = columns[None, :] != slots[:, None]  # other slots' columns, and every column of a slot -1 row
    assert (u[others] == 0).all()


def test_strided_rows_and_an_unused_slot():
    """A view whose rows are further apart than K (the attention output, say), and slots no row uses."""
    x = torch.randn(20, 160, device=DEVICE)[:, 32:96]
    lora_a = torch.randn(5, 16, 64, device=DEVICE)
    slots = torch.tensor([0, 3] * 10, device=DEVICE)
    u = lora_shrink(x, lora_a, slots, out=torch.full((20, 80), float("nan"), device=DEVICE))
    assert rel_err(u, lora_shrink_ref(x, lora_a, slots)) < 1e-5
    assert (u[:, 16:48] == 0).all() and (u[:, 64:] == 0).all()


@pytest.mark.parametrize("case", ["dtype", "width", "slots", "slot_dtype", "out", "columns"])
def test_bad_inputs_are_named(case):
    x, lora_a, slots = shrink_case(4, 2, 16, 64, torch.float32)
    out = None
    match = {
        "dtype": "lora_a has dtype", "width": "last dim must be 64", "slots": "3 entries for 4 rows",
        "slot_dtype": "slots has dtype", "out": "out has shape", "columns": "unit column stride",
    }[case]  # fmt: skip
    if case == "dtype":
        lora_a = lora_a.half()
    elif case == "width":
        lora_a = lora_a[:, :, :32].contiguous()
    elif case == "slots":
        slots = slots[:3]
    elif case == "slot_dtype":
        slots = slots.int()
    elif case == "out":
        out = torch.empty(4, 31, device=DEVICE)
    else:
        x = torch.randn(64, 4, device=DEVICE).t()
    with pytest.raises(ValueError, match=match):
        lora_shrink(x, lora_a, slots, out=out)


def test_compile_specs_cover_every_argument():
    for s in compile_specs():
        assert set(s.signature) | set(s.constexprs) == set(s.fn.arg_names), s.name
