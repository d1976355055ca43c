"""GELU (tanh approximation, GPT-2's ``gelu_new``): ours vs ``F.gelu(approximate="tanh")`` and ``torch.compile`` of it.

    python bench/kernels/gelu.py                  # CUDA: rows 1..65536 of GPT-2 Medium's MLP width (4096)
    python bench/kernels/gelu.py --dry-run        # CPU: tiny sizes under the Triton interpreter

Memory-bound: GB/s (x read, y written) against the measured copy bandwidth. ``torch.compile`` writes its own
Triton elementwise kernel: the fair rival.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.harness import Bench, Case, Setup, main  # noqa: E402
from bench.shapes import model_for  # noqa: E402

ROWS, DRY_ROWS = (1, 16, 64, 256, 1024, 4096, 16384, 65536), (1, 33)


def torch_gelu(x):
    return F.gelu(x, approximate="tanh")


def case(bench: Bench, dtype: torch.dtype, rows: int, width: int) -> Case:
    from kernels.gelu import gelu, gelu_ref

    def setup() -> Setup:
        x = bench.randn(rows, width, dtype=dtype)
        compiled = bench.compile(torch_gelu)

        def calls(x) -> dict:
            return {"triton": lambda: gelu(x), "torch": lambda: torch_gelu(x), "torch.compile": lambda: compiled(x)}

        return Setup(calls(x), gelu_ref(x.float()), copies=lambda: calls(x.clone()), copy_bytes=x.nbytes)

    elt = torch.finfo(dtype).bits // 8
    return Case("gelu", f"gelu {rows}x{width}", dtype, setup, nbytes=2 * rows * width * elt, variant=f"width {width}")


def cases(bench: Bench, dtype: torch.dtype, args) -> list[Case]:
    width = model_for(bench.dry_run).d_ff
    out = []
    for rows in args.rows or (DRY_ROWS if bench.dry_run else ROWS):
        out.append(case(bench, dtype, rows, width))
        out[-1].sweep, out[-1].x = "rows", rows
    return out


def add_arguments(ap) -> None:
    ap.add_argument("--rows", type=int, nargs="+", default=None, help="rows of GPT-2's MLP activation")


if __name__ == "__main__":
    sys.exit(main("gelu", __doc__, cases, add_arguments=add_arguments))
