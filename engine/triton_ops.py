"""The ``triton`` backend: every op of the GPT-2 graph through the hand-written kernels in ``kernels/``.

On CUDA the kernels are compiled; on CPU they run in Triton's interpreter (slow: for checking parity, not
for speed). Triton reads ``TRITON_INTERPRET`` when a kernel module is imported, so the choice is made once,
before the first import of ``kernels.*``.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

from engine.ops import Ops
from kernels import KERNEL_MODULES


def _import_kernels(device: torch.device) -> dict[str, object]:
    """Import the kernel modules in the mode ``device`` needs (interpreter on CPU, compiled on CUDA)."""
    interpret = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    if device.type == "cpu" and not interpret:
        if any(f"kernels.{m}" in sys.modules for m in KERNEL_MODULES):
            raise ValueError(
                "backend='triton' on CPU needs Triton's interpreter, but the kernels were already imported "
                "compiled; set TRITON_INTERPRET=1 before importing engine, or use backend='torch'"
            )
        os.environ["TRITON_INTERPRET"] = "1"  # read by @triton.jit as the modules below are imported
    elif device.type == "cuda" and interpret:
        raise ValueError("backend='triton' on CUDA but TRITON_INTERPRET=1 is set; unset it to compile the kernels")
    return {m: importlib.import_module(f"kernels.{m}") for m in KERNEL_MODULES}


class TritonOps(Ops):
    """Hand-written Triton kernels behind the op interface."""

    name = "triton"
    cuda_graphs = True

    def __init__(self, device: torch.device) -> None:
        k = _import_kernels(device)
        self._layer_norm = k["layernorm"].layer_norm
        self._gelu = k["gelu"].gelu
        self._linear = k["linear"].linear
        self._quant_linear = k["quant"].quant_linear
        self._quantize_int8, self._quantize_int4 = k["quant"].quantize_int8, k["quant"].quantize_int4
        self._prefill = k["attention"].prefill_attention
        self._decode = k["paged_attention"].decode_attention
        self._context = k["context_attention"].context_attention
        self._store = k["kv_cache"].store_kv
        self._lora_shrink = k["lora"].lora_shrink

    def prepare_weight(self, weight, quantization=None):
        if quantization is None:
            return weight
        if quantization == "int8":
            return self._quantize_int8(weight)
        if quantization == "int4":  # groups of 128 along K, or 64 where 128 does not divide it (gpt2-xl)
            return self._quantize_int4(weight, group_size=128 if weight.shape[1] % 128 == 0 else 64)
        raise ValueError(f"quantization must be None, 'int8' or 'int4', got {quantization!r}")

    def layer_norm(self, x, weight, bias, eps, residual=None):
        return self._layer_norm(x, weight, bias, eps, residual)

    def linear(self, x, weight, bias=None, activation=None, residual=None):
        fn = self._linear if isinstance(weight, torch.Tensor) else self._quant_linear
        return fn(x, weight, bias, activation, residual)

    def gelu(self, x):
        return self._gelu(x)

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        self._store(k, v, k_cache, v_cache, slot_mapping)

    def lora_shrink(self, x, lora_a, token_slots):
        return self._lora_shrink(x, lora_a, token_slots)  # the expand is self.linear over all slots

    def prefill_attention(self, q, k, v, cu_seqlens, max_seqlen, scale, kv_cache=None):
        return self._prefill(q, k, v, cu_seqlens, max_seqlen, scale, kv_cache=kv_cache)  # K/V stored in the pass

    def decode_attention(self, q, k_cache, v_cache, block_tables, context_lens, max_context_len, scale):
        return self._decode(q, k_cache, v_cache, block_tables, context_lens, max_context_len, scale)

    def context_attention(self, q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, max_seqlen_q,
                          max_seqlen_k, scale):  # fmt: skip
        return self._context(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, max_seqlen_q, max_seqlen_k,
                             scale)  # fmt: skip
