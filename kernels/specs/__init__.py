"""Ahead-of-time compile specs: ``kernels/specs/<family>.py`` lists every compile of ``kernels/<family>.py``.

Each spec module has ``compile_specs()``, one :class:`KernelSpec` per kernel x config x variant its launcher can
run, which ``python -m engine check-kernels`` (:mod:`kernels.compile_gate`) compiles for sm_80 and sm_90. A spec
module is its kernel module's companion and reads its (private) kernels and config lists; the launchers never
import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Triton's names for the element types of kernel arguments.
TL_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
}


@dataclass
class KernelSpec:
    """One ahead-of-time compile of one kernel, for the compile gate (``python -m engine check-kernels``).

    ``signature`` maps every non-constexpr argument to a Triton type string ("*fp16", "i32", "fp32", ...); a
    ``:16`` suffix ("i32:16") promises divisibility by 16, as the runtime would specialize it. ``constexprs``
    gives the ``tl.constexpr`` arguments (block sizes included; left out, they take the kernel's default);
    ``num_warps``/``num_stages`` come from the autotune config being checked.
    """

    name: str  # human-readable, e.g. "linear[fp16,bias,gelu] BLOCK_M=64 BLOCK_N=128 BLOCK_K=64 w4 s4"
    fn: object  # the @triton.jit function (the gate unwraps @triton.autotune)
    signature: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
