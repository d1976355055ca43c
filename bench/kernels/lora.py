"""Batched LoRA's shrink (``kernels/lora.py``): each row times its own adapter's A, against the masked dense matmul
the torch backend runs (every slot's columns computed, the row's own kept) and ``torch.compile`` of it.

    python bench/kernels/lora.py                  # CUDA: rows 1..16384 of GPT-2 Medium's width, 4 slots of rank 16
    python bench/kernels/lora.py --dry-run        # CPU: tiny sizes under the Triton interpreter

Rows are spread over every slot and the base model (slot -1). Memory-bound at decode sizes: GB/s (x read, the used
slots' A read, u written) against the measured copy bandwidth; TFLOP/s counts each row's own rank only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.harness import Bench, Case, Setup, main  # noqa: E402
from bench.shapes import model_for  # noqa: E402

ROWS, DRY_ROWS = (1, 4, 16, 64, 256, 1024, 4096, 16384), (1, 33)
SLOTS, RANK = 4, 16


def torch_shrink(x, lora_a, slots):
    """The torch backend's shrink (``engine.ops.Ops.lora_shrink``): every slot's columns, then the row's own."""
    from engine.ops import Ops

    return Ops.lora_shrink(None, x, lora_a, slots)


def case(bench: Bench, dtype: torch.dtype, rows: int, width: int, num_slots: int, rank: int) -> Case:
    from kernels.lora import lora_shrink, lora_shrink_ref

    def setup() -> Setup:
        x = bench.randn(rows, width, dtype=dtype)
        lora_a = bench.randn(num_slots, rank, width, dtype=dtype) / width**0.5
        slots = torch.arange(rows, device=x.device) % (num_slots + 1) - 1  # -1 (base), 0, 1, ... in turn
        compiled = bench.compile(torch_shrink)

        def calls(x) -> dict:
            return {"triton": lambda: lora_shrink(x, lora_a, slots), "torch": lambda: torch_shrink(x, lora_a, slots),
                    "torch.compile": lambda: compiled(x, lora_a, slots)}  # fmt: skip

        return Setup(calls(x), lora_shrink_ref(x.float(), lora_a.float(), slots),
                     copies=lambda: calls(x.clone()), copy_bytes=x.nbytes)  # fmt: skip

    elt = torch.finfo(dtype).bits // 8
    used = min(rows, num_slots)  # slots some row uses
    nbytes = (rows * width + used * rank * width + rows * num_slots * rank) * elt
    name = f"lora_shrink {rows}x{width} {num_slots}x{rank}"
    return Case("lora", name, dtype, setup, flops=2 * rows * width * rank, nbytes=nbytes,
                variant=f"{num_slots} slots of rank {rank}")  # fmt: skip


def cases(bench: Bench, dtype: torch.dtype, args) -> list[Case]:
    width = model_for(bench.dry_run).d
    out = []
    for rows in args.rows or (DRY_ROWS if bench.dry_run else ROWS):
        out.append(case(bench, dtype, rows, width, args.slots, args.rank))
        out[-1].sweep, out[-1].x = "rows", rows
    return out


def add_arguments(ap) -> None:
    ap.add_argument("--rows", type=int, nargs="+", default=None, help="rows of the batch")
    ap.add_argument("--slots", type=int, default=SLOTS, help="adapters on the device (max_loras)")
    ap.add_argument("--rank", type=int, default=RANK, help="ranks per slot (max_lora_rank)")


if __name__ == "__main__":
    sys.exit(main("lora", __doc__, cases, add_arguments=add_arguments))
