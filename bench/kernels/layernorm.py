"""LayerNorm, alone and fused with the residual add: ours vs torch's ``F.layer_norm`` and ``torch.compile`` of it.

    python bench/kernels/layernorm.py                  # CUDA: rows 1..65536 at width 1024; widths 768..8192, 4096 rows
    python bench/kernels/layernorm.py --rows 4096 --widths 1024 --dtype bfloat16
    python bench/kernels/layernorm.py --dry-run        # CPU: tiny sizes under the Triton interpreter

Memory-bound: reported in GB/s (x and the residual read, y and the new residual stream written) against the
measured copy bandwidth. ``torch.compile`` fuses the add and the norm into one Triton kernel of its own: the fair
rival of the fused kernel.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.harness import Bench, Case, Setup, main  # noqa: E402

EPS = 1e-5
ROWS, WIDTH_AT = (1, 16, 64, 256, 1024, 4096, 16384, 65536), 1024  # GPT-2 Medium's width
WIDTHS, ROWS_AT = (768, 1024, 1280, 1600, 2048, 4096, 8192), 4096  # GPT-2 small..xl, up to the kernel's widest
DRY_ROWS, DRY_WIDTH_AT, DRY_WIDTHS, DRY_ROWS_AT = (1, 33), 128, (96, 1600), 5


def torch_layer_norm(x, weight, bias, residual):
    """The peer: the residual add, then LayerNorm; returns ``(y, h)`` as the kernel does."""
    h = x if residual is None else x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, EPS), h


def case(bench: Bench, dtype: torch.dtype, rows: int, width: int, residual: bool) -> Case:
    from kernels.layernorm import layer_norm, layer_norm_ref

    def setup() -> Setup:
        x, r = bench.randn(rows, width, dtype=dtype), bench.randn(rows, width, dtype=dtype) if residual else None
        w, b = bench.randn(width, dtype=dtype, scale=0.1) + 1, bench.randn(width, dtype=dtype, scale=0.1)
        y_ref, h_ref = layer_norm_ref(x.float(), w.float(), b.float(), EPS, None if r is None else r.float())
        compiled = bench.compile(torch_layer_norm)

        def calls(x, r) -> dict:
            return {
                "triton": lambda: layer_norm(x, w, b, EPS, r),
                "torch": lambda: torch_layer_norm(x, w, b, r),
                "torch.compile": lambda: compiled(x, w, b, r),
            }

        def copies() -> dict:  # the same op over copies of the rows (see harness.time_calls)
            return calls(x.clone(), None if r is None else r.clone())

        picked = (lambda out: out) if residual else (lambda out: out[0])  # y, and h when it is a new tensor
        c = calls(x, r)
        return Setup(
            calls=c,
            reference=(y_ref, h_ref) if residual else y_ref,
            outputs={p: (lambda fn=fn: picked(fn())) for p, fn in c.items()},
            copies=copies,
            copy_bytes=x.nbytes * (2 if residual else 1),
        )

    elt = torch.finfo(dtype).bits // 8
    return Case(
        "layernorm",
        f"layer_norm{'+residual' if residual else ''} {rows}x{width}",
        dtype,
        setup,
        nbytes=(4 if residual else 2) * rows * width * elt,  # x (+ r) in, y (+ h) out
        variant="residual" if residual else "plain",
        params=dict(rows=rows, width=width),
    )


def cases(bench: Bench, dtype: torch.dtype, args) -> list[Case]:
    dry = bench.dry_run
    rows = args.rows or (DRY_ROWS if dry else ROWS)
    widths = args.widths or (DRY_WIDTHS if dry else WIDTHS)
    out = []
    for residual in (False, True):
        for n in rows:
            out.append(case(bench, dtype, n, DRY_WIDTH_AT if dry else WIDTH_AT, residual))
            out[-1].sweep, out[-1].x = "rows", n
        for w in widths:
            out.append(case(bench, dtype, DRY_ROWS_AT if dry else ROWS_AT, w, residual))
            out[-1].sweep, out[-1].x = "width", w
    return out


def add_arguments(ap) -> None:
    ap.add_argument("--rows", type=int, nargs="+", default=None, help="rows of the rows sweep")
    ap.add_argument("--widths", type=int, nargs="+", default=None, help="widths of the width sweep")


if __name__ == "__main__":
    sys.exit(main("layernorm", __doc__, cases, add_arguments=add_arguments))
