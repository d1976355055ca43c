"""The op interface the GPT-2 graph is written against.

A backend implements every method of :class:`Ops`: the ``torch`` backend (:mod:`engine.torch_ops`) is the CPU path
and the correctness baseline; the ``triton`` backend (:mod:`engine.triton_ops`) runs the same graph through the
kernels in ``kernels/``.

Shapes and layouts shared by every backend:
  * activations are 2-D ``[T, D]`` (tokens of a ragged batch packed together), or ``[T, H, hd]`` views;
  * linear weights are ``[N, K]`` (``nn.Linear``'s ``[out, in]``); a backend may re-lay them out once at
    load time through :meth:`Ops.prepare_weight` and then receives what that returned;
  * the KV cache of one layer is two tensors ``[num_blocks, block_size, H, hd]``; token ``t`` of a sequence
    lives at slot ``block_table[t // block_size] * block_size + t % block_size``; slot ``-1`` means "skip".
"""

from __future__ import annotations

import torch


class Ops:
    """The ops of the GPT-2 forward pass. Every method is pure apart from :meth:`store_kv`."""

    name = "abstract"
    # Whether a decode step through these ops can be captured as a CUDA graph: no host syncs, no shapes that
    # depend on tensor values, and padding rows (slot -1, context 0) handled on the device.
    cuda_graphs = False

    def prepare_weight(self, weight: torch.Tensor, quantization: str | None = None) -> object:
        """Called once per linear weight ``[N, K]`` at load time; the result is what :meth:`linear` receives.

        ``quantization`` ("int8", "int4" or None) asks for the backend's weight-only quantized format.
        """
        if quantization is not None:
            raise ValueError(f"the {self.name} backend does not quantize weights (asked for {quantization!r})")
        return weight

    def prepare_lm_head(self, weight: torch.Tensor, quantization: str | None = None) -> object:
        """Like :meth:`prepare_weight` for the LM head ``[V, D]``, which stays unquantized: by default in the
        model's dtype whatever ``quantization`` the block weights use."""
        return self.prepare_weight(weight)

    def layer_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``h = x + residual`` (or ``x``); returns ``(LayerNorm(h), h)``. Statistics in fp32."""
        raise NotImplementedError

    def linear(
        self,
        x: torch.Tensor,
        weight: object,
        bias: torch.Tensor | None = None,
        activation: str | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``act(x @ weight.T + bias) + residual`` for ``x [M, K]``; ``activation`` is None or "gelu_tanh"."""
        raise NotImplementedError

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise GELU-tanh."""
        raise NotImplementedError

    def lora_shrink(self, x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
        """The first half of batched LoRA (:mod:`engine.lora`): ``u [M, S * R]`` whose row ``m`` holds
        ``x[m] @ lora_a[s].T`` in columns ``s * R .. (s + 1) * R`` for ``s = token_slots[m]``, and zeros in every
        other column (all of them where ``token_slots[m]`` is -1). ``x [M, K]``, ``lora_a [S, R, K]``,
        ``token_slots [M]`` int64. This default computes every slot's columns and keeps the row's own."""
        S, R, K = lora_a.shape
        u = (x @ lora_a.view(S * R, K).t()).view(-1, S, R)
        mine = token_slots[:, None] == torch.arange(S, device=x.device)  # [M, S]
        return torch.where(mine[:, :, None], u, 0).view(-1, S * R)

    def store_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Write ``k, v [T, H, hd]`` (may be strided views) into the caches at ``slot_mapping [T]``."""
        raise NotImplementedError

    def prefill_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        scale: float,
        kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Causal attention within each sequence of a ragged batch.

        ``q, k, v`` are ``[T, H, hd]`` (strided views of the fused QKV output are fine); sequence ``i`` is
        rows ``cu_seqlens[i]:cu_seqlens[i+1]`` (int32, ``[B+1]``). Returns a contiguous ``[T, H, hd]``.
        ``kv_cache = (k_cache, v_cache, slot_mapping)``: also :meth:`store_kv` the keys and values (a backend
        may do it in the same pass).
        """
        raise NotImplementedError

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        max_context_len: int,
        scale: float,
    ) -> torch.Tensor:
        """One query per sequence against its cached keys.

        ``q [B, H, hd]``; ``block_tables [B, max_blocks]`` int32; ``context_lens [B]`` int32 counts the
        cached tokens (the current token included, already stored). Returns a contiguous ``[B, H, hd]``.
        """
        raise NotImplementedError

    def context_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
        scale: float,
    ) -> torch.Tensor:
        """Chunks of queries against everything their sequence has in the cache (chunked prefill, cached prefixes).

        ``q [T, H, hd]`` packs the chunks: sequence ``b``'s are rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` (int32,
        ``[B+1]``); its K/V, this step's included, are already stored: ``seq_lens [B]`` (int32) tokens through
        ``block_tables [B, max_blocks]``. Query ``i`` of a chunk of ``L`` sits at position ``seq_lens[b] - L + i``
        and attends causally to positions ``0 ..`` itself. ``max_seqlen_q``/``max_seqlen_k`` bound the chunk lengths
        and ``seq_lens``. Returns a contiguous ``[T, H, hd]``.
        """
        raise NotImplementedError
