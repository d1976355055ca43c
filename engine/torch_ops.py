"""The plain-PyTorch backend of :class:`engine.ops.Ops`: the CPU path and the baseline every other backend is
checked against. On CPU its linears, decode attention and KV store run the hand-written kernels of
:mod:`engine.cpu_kernels`, or where those can't run, PyTorch's ops (with the CPU weight layouts PyTorch's GEMMs are
fastest on: oneDNN's packed fp32, fbgemm's packed fp16)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine import cpu_kernels, cpu_onednn
from engine.ops import Ops

ACTIVATIONS = (None, "gelu_tanh")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``gelu_new``: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return F.gelu(x, approximate="tanh")


# The batch size oneDNN lays a packed weight out for (it serves every M). gpt2-medium's block GEMMs, 2 cores, AVX2,
# medians of interleaved runs: packed for 32 rows against 1, M=1 52 vs 54 ms (25 runs), M=8 95 vs 119 ms,
# M=32 177 vs 218 ms, M=256 1195 vs 1222 ms (16 and 64 rows: no better overall).
ONEDNN_PACK_ROWS = 32


def _pack_for_onednn(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's pre-packed layout of an fp32 CPU weight ``[N, K]``, or None where oneDNN can't take it.

    The same packing PyTorch's inductor uses when it freezes a CPU model; measured on gpt2-medium's
    block weights with 2 cores: 40 ms per decode step at M=1 vs 58 ms for ``addmm``, and 48 vs 135 ms at M=8.
    """
    if weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), ONEDNN_PACK_ROWS)
    except (AttributeError, RuntimeError):  # an older torch, or a CPU oneDNN doesn't support
        return None


FP16_MAX = torch.finfo(torch.float16).max


class Fp16PackedWeight:
    """A 16-bit CPU linear weight in fbgemm's packed fp16 layout: 2 bytes read per weight, converted in registers
    (F16C), fp32 activations and accumulation.

    The fastest 16-bit path PyTorch has on an AVX2 CPU (oneDNN's bf16/fp16 GEMMs need AVX-512 or AVX-NE-CONVERT,
    and torch's own 16-bit GEMM runs about 5x slower than fp32 at M=8): measured on gpt2-medium's 97 linears with
    2 cores, 32 ms a decode step at M=1 and 62 ms at M=8, against 68 / 130 ms for fp32 through oneDNN.
    bf16 weights go through fp16 losslessly where they fit its range (checked by :func:`_pack_fp16`).
    """

    def __init__(self, packed: object, shape: tuple[int, int]) -> None:
        self.packed = packed
        self.shape = shape

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` in fp32 for ``x [M, K]`` of any float dtype."""
        return torch.ops.quantized.linear_dynamic_fp16(x.float(), self.packed)


def _pack_fp16(weight: torch.Tensor) -> Fp16PackedWeight | None:
    """fbgemm's packed fp16 of a 16-bit CPU weight, or None (no fbgemm on this CPU or build, or a bf16 weight
    beyond fp16's range, where fp16 would not hold it)."""
    if weight.dtype not in (torch.float16, torch.bfloat16) or weight.abs().amax() > FP16_MAX:
        return None
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(weight.float().contiguous(), None)
    except (AttributeError, RuntimeError):
        return None
    return Fp16PackedWeight(packed, tuple(weight.shape))


def _sdpa(q, k, v, mask, scale, causal=False) -> torch.Tensor:
    """SDPA over ``[..., H, T, hd]`` views, called in 4-D: PyTorch's CPU flash-attention kernel takes only 4-D inputs,
    and 3-D ones ran its math path (one 512-token sequence's 16 heads in fp32, 2 Xeon cores: 20.7 ms against 5.9).

    On CPU, 16-bit inputs run in fp32, where PyTorch's 16-bit SDPA ran 2-4x slower (2 cores, AVX2: a decode layer at
    batch 8, context 96, 2.4 ms in fp16 vs 0.56 ms through fp32), except bf16 on a CPU with AMX, whose bf16 kernel
    ran 3x faster than fp32 (that sequence: 1.9 against 5.9 ms)."""
    batched = q.dim() == 4
    if not batched:
        q, k, v = q[None], k[None], v[None]
    dtype = q.dtype
    if q.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        if not (dtype == torch.bfloat16 and cpu_onednn.HAS_AMX):
            q, k, v = q.float(), k.float(), v.float()
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale).to(dtype)
    return o if batched else o[0]


def _kernels_on() -> bool:
    """Whether to call :mod:`engine.cpu_kernels`: not while ``torch.compile`` traces, since it can't trace a ctypes
    call (the PyTorch path goes into the graph instead)."""
    return not torch.compiler.is_compiling()


def _host_all(mask: torch.Tensor) -> bool:
    """Whether every element is set, read on the host; False under ``torch.compile`` (no data-dependent branch there:
    the general path is taken)."""
    return not torch.compiler.is_compiling() and bool(mask.all())


def _valid_slots(slot_mapping: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(keep, slots)``: the rows to store (None: all of them) and their int64 slots."""
    keep = slot_mapping >= 0
    if _host_all(keep):
        return None, slot_mapping.long()
    return keep, slot_mapping[keep].long()


def _decode_gather(
    block_tables: torch.Tensor, context_lens: torch.Tensor, max_context_len: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(slots, mask)`` for a decode step: the flat cache slot of each sequence's positions ``0 .. S-1``
    (``[B * S]``; past a sequence's context its first slot, always written, so never NaN or stale garbage) and the
    attention mask ``[B, 1, 1, S]`` hiding those, or None where every sequence fills ``S``."""
    B, S = block_tables.shape[0], max_context_len
    pos = torch.arange(S, device=block_tables.device)
    valid = pos[None, :] < context_lens[:, None]  # (B, S): a cached token is there
    slots = block_tables.gather(1, (pos // block_size).expand(B, -1)).long() * block_size + pos % block_size
    if _host_all(valid):
        return slots.view(-1), None
    return torch.where(valid, slots, slots[:, :1]).view(-1), valid[:, None, None, :]


class TorchOps(Ops):
    """Plain PyTorch: the CPU backend and the baseline every other backend is checked against.

    Not capturable as a CUDA graph (``store_kv`` selects the valid slots with a boolean mask, a host sync), so
    on CUDA it decodes eagerly.
    """

    name = "torch"

    def __init__(self) -> None:
        self._memos: dict[str, tuple] = {}  # see _step_memo

    def prepare_weight(self, weight: torch.Tensor, quantization: str | None = None) -> object:
        if quantization is not None:
            from engine.quantization import quantize

            return quantize(weight, quantization)  # our CPU GEMM for int8, else PyTorch's weight-only GEMMs
        if weight.device.type != "cpu":
            return weight
        if cpu_kernels.gemm_supports(weight):
            return cpu_kernels.GemmWeight(weight)
        packed = _pack_for_onednn(weight) if weight.dtype == torch.float32 else _pack_fp16(weight)
        if packed is not None:
            return packed
        if weight.dtype != torch.float32:
            # torch's own 16-bit CPU matmul has a fast fp32-accumulating GEMV for W stored [N, K] (column-major
            # storage is ~25x slower there)
            return weight.contiguous()
        # CPU BLAS runs x @ W faster with W stored [K, N] (~25% at M=1 on gpt2-medium), so keep the logical
        # [N, K] tensor with column-major storage; ``linear`` passes ``weight.t()``.
        return weight.t().contiguous().t()

    def prepare_lm_head(self, weight: torch.Tensor, quantization: str | None = None) -> object:
        # Under weight quantization on CPU, an fp32 head in fp16: half its bytes (the head is a third of what an
        # int8 decode step reads; 9 -> 5 ms at batch 1 on gpt2-medium) for a rounding far below the quantized
        # blocks' own (logits' SQNR stays above 40 dB).
        if quantization is not None and weight.device.type == "cpu" and weight.dtype == torch.float32:
            head = self.prepare_weight(weight.half())
            if not isinstance(head, torch.Tensor):  # the fp16 GEMM, not torch's mm (which can't mix dtypes)
                return head
        if cpu_kernels.gemm_supports(weight):  # read in place, unpacked: its storage is the embedding's
            return cpu_kernels.GemmWeight(weight, pack=False)
        return self.prepare_weight(weight)

    def layer_norm(self, x, weight, bias, eps, residual=None):
        h = x if residual is None else x + residual
        if weight.dtype == h.dtype:  # PyTorch's LayerNorm keeps 16-bit inputs' statistics in fp32 itself
            return F.layer_norm(h, (h.shape[-1],), weight, bias, eps), h
        y = F.layer_norm(h.float(), (h.shape[-1],), weight.float(), bias.float(), eps)
        return y.to(x.dtype), h

    def linear(self, x, weight, bias=None, activation=None, residual=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        gemm = weight if isinstance(weight, cpu_kernels.GemmWeight) else getattr(weight, "kernel", None)
        if gemm is not None:  # the CPU GEMM (int8 weights too), its epilogue fused
            if _kernels_on():
                return gemm.linear(x, bias, activation == "gelu_tanh", residual)
            weight = gemm.dense(x.dtype)  # torch.compile can't trace a ctypes call: a plain matmul in its graph
        if isinstance(weight, torch.Tensor) and weight.layout == torch._mkldnn:  # oneDNN with fused epilogues
            x = x.contiguous()
            if residual is not None and activation is None:
                return cpu_onednn.linear(x, weight, bias, False, residual)
            y = cpu_onednn.linear(x, weight, bias, activation is not None, None)
        else:
            if isinstance(weight, torch.Tensor):
                wt = weight.t()
                y = torch.addmm(bias, x, wt) if bias is not None else torch.mm(x, wt)
            else:  # fbgemm's fp16 or a quantized weight (engine.quantization): fp32 out, epilogue in fp32
                y = weight.matmul(x)
                if bias is not None:
                    y += bias
            if activation == "gelu_tanh":
                y = gelu_tanh(y)
        if residual is not None:
            y += residual
        return y.to(x.dtype)

    def gelu(self, x):
        return gelu_tanh(x)

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        if _kernels_on() and cpu_kernels.store_supports(k, k_cache):
            cpu_kernels.store_kv(k, v, k_cache, v_cache, slot_mapping)
            return
        keep, slots = self._step_memo("store", (slot_mapping,), (), lambda: _valid_slots(slot_mapping))
        if keep is not None:
            k, v = k[keep], v[keep]
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)

    def prefill_attention(self, q, k, v, cu_seqlens, max_seqlen, scale, kv_cache=None):
        if kv_cache is not None:
            self.store_kv(k, v, *kv_cache)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            # (T, H, hd) -> (H, T, hd) for SDPA, one causal call a sequence: PyTorch's flash kernel skips the masked
            # tiles (1024 tokens, 2 Xeon cores: 11.5 ms in fp32, where blocks of 256 queries took 13.6)
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
            out[start:end] = _sdpa(qs, ks, vs, None, scale, causal=True).transpose(0, 1)
        return out

    def decode_attention(self, q, k_cache, v_cache, block_tables, context_lens, max_context_len, scale):
        if _kernels_on() and cpu_kernels.attention_supports(k_cache):  # in place through the block tables
            return cpu_kernels.decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale).to(q.dtype)
        B, S = q.shape[0], max_context_len
        block_size = k_cache.shape[1]
        slots, mask = self._step_memo(
            "decode",
            (block_tables, context_lens),
            (S, block_size),
            lambda: _decode_gather(block_tables, context_lens, S, block_size),
        )
        shape = (B, S, *k_cache.shape[2:])
        keys = k_cache.flatten(0, 1).index_select(0, slots).view(shape).transpose(1, 2)  # (B, H, S, hd)
        values = v_cache.flatten(0, 1).index_select(0, slots).view(shape).transpose(1, 2)
        return _sdpa(q.unsqueeze(2), keys, values, mask, scale).squeeze(2)

    def _step_memo(self, name: str, tensors: tuple[torch.Tensor, ...], extra: tuple, compute):
        """``compute()``, reused while the same ``tensors`` come back unmodified with the same ``extra`` arguments:
        every layer of a step passes the step's slot mapping and block tables, so their index math runs once a step
        instead of once a layer."""
        if torch.compiler.is_compiling():  # a traced graph holds no Python state between calls
            return compute()
        versions = tuple(t._version for t in tensors)
        memo = self._memos.get(name)
        if memo is None or memo[1:3] != (versions, extra) or any(a is not b for a, b in zip(memo[3], tensors)):
            memo = (compute(), versions, extra, tensors)
            self._memos[name] = memo
        return memo[0]

    def context_attention(self, q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, max_seqlen_q,
                          max_seqlen_k, scale):  # fmt: skip
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        block_size = k_cache.shape[1]
        flat_k, flat_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)  # (slots, H, hd)
        bounds = cu_seqlens_q.tolist()
        for b, (start, end, n) in enumerate(zip(bounds[:-1], bounds[1:], seq_lens.tolist())):
            if end == start:
                continue
            pos = torch.arange(n, device=q.device)
            slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
            keys, values = flat_k[slots].transpose(0, 1), flat_v[slots].transpose(0, 1)  # (H, n, hd)
            q_pos = torch.arange(n - (end - start), n, device=q.device)
            causal = pos[None, :] <= q_pos[:, None]  # (L, n)
            o = _sdpa(q[start:end].transpose(0, 1), keys, values, causal, scale)
            out[start:end] = o.transpose(0, 1)
        return out
