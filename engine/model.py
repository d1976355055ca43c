"""The GPT-2 forward pass, written once against :class:`engine.ops.Ops`.

Tokens of a ragged batch are packed into one ``[T, D]`` matrix. Per block (pre-LN, Radford et al. 2019):
    h = h + attn_proj(attention(ln_1(h)))      # residual add fused into the projection's epilogue
    h = h + mlp_proj(gelu(fc(ln_2(h))))        # GELU fused into fc, residual into mlp_proj
Three entry points, one graph: ``prefill`` runs prompts from their first token (causal attention within each,
K/V written to the paged cache on the way); ``decode`` feeds one token per sequence and attends over that
sequence's cached blocks (the step captured as a CUDA graph); ``extend`` runs a mixed step of decode tokens and
prompt chunks whose queries attend to everything their sequence has in the cache (chunked prefill, prefix-cache
hits, recompute after preemption).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.ops import Ops
from engine.weights import GPT2Weights

# attention(q, k, v, layer) -> [T, H, hd], storing k and v in the layer's paged cache on the way; q, k, v are
# [T, H, hd] views of the fused QKV output
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class PrefillBatch:
    """Tensors describing a prefill step over packed prompts (all on the model's device)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    cu_seqlens: torch.Tensor  # [B+1] int32, prompt boundaries in the packed rows
    max_seqlen: int
    slot_mapping: torch.Tensor  # [T] int64, where each token's K/V goes (-1: don't cache)
    lora_slots: torch.Tensor | None = None  # [T] int64, each token's LoRA slot (-1: none); None: no LoRA at all


@dataclass
class DecodeBatch:
    """Tensors describing a decode step: one new token per row, a row per sequence (or several: its last token and
    its drafts, each at its own position, when speculating)."""

    input_ids: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    slot_mapping: torch.Tensor  # [B] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32, tokens cached after this step's store (= positions + 1)
    max_context_len: int
    lora_slots: torch.Tensor | None = None  # [B] int64, as PrefillBatch's


@dataclass
class ExtendBatch:
    """A mixed step: ``num_decodes`` sequences feed one token each (rows ``0 .. num_decodes - 1``), then the chunks
    of the others (packed rows). Every token's K/V is stored first; queries attend to their sequence's cache."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    num_decodes: int
    block_tables: torch.Tensor  # [B, max_blocks] int32, decode sequences first
    seq_lens: torch.Tensor  # [B] int32, tokens of each sequence in the cache after this step
    max_decode_len: int  # max of seq_lens over the decode sequences
    chunk_cu_seqlens: torch.Tensor  # [B - num_decodes + 1] int32, chunk boundaries in rows num_decodes ..
    max_chunk_len: int
    max_seq_len: int  # max of seq_lens over the chunk sequences
    lora_slots: torch.Tensor | None = None  # [T] int64, as PrefillBatch's


class GPT2:
    """GPT-2 with its weights, running on one backend's ops."""

    def __init__(self, config: ModelConfig, weights: GPT2Weights, ops: Ops, quantization: str | None = None) -> None:
        self.config = config
        self.ops = ops
        # once, at load: re-layout (and quantize the block weights, if asked) for the backend; the head is never
        # quantized
        weights.map_linear(lambda w: ops.prepare_weight(w, quantization))
        self.w = weights
        self.lm_head = ops.prepare_lm_head(weights.head, quantization)
        self.scales = [config.attn_scale(i) for i in range(config.n_layer)]
        # LoRA adapters' device slots, engine.lora.LoRASlots.stacks: [layer][linear] = (a [S, R, K], b [N, S * R])
        self.lora: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def _linear(self, x, weight, bias, lora, slots, activation=None, residual=None) -> torch.Tensor:
        """A block linear, plus the LoRA update of each row's adapter when ``slots`` is given:
        ``act(x W.T + bias + u b.T) + residual`` with ``u = lora_shrink(x, a, slots)`` (the update's residual and
        activation ride on the GEMMs' epilogues where the activation allows)."""
        if slots is None:
            return self.ops.linear(x, weight, bias, activation, residual)
        a, b = lora
        if activation is None:  # the residual joins the update, which joins the base GEMM's epilogue
            update = self.ops.linear(self.ops.lora_shrink(x, a, slots), b, residual=residual)
            return self.ops.linear(x, weight, bias, residual=update)
        update = self.ops.linear(self.ops.lora_shrink(x, a, slots), b)  # added before the activation
        y = self.ops.gelu(self.ops.linear(x, weight, bias, residual=update))
        return y if residual is None else y + residual

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttentionFn, lora_slots: torch.Tensor | None
    ) -> torch.Tensor:
        """Embeddings through every block; returns the residual stream *before* ln_f, ``[T, D]``. ``lora_slots``:
        each token's LoRA slot (-1: none), or None to run the base model alone."""
        cfg, ops, w = self.config, self.ops, self.w
        slots = lora_slots if self.lora is not None else None
        T, H, hd = input_ids.shape[0], cfg.n_head, cfg.head_dim
        eps = cfg.layer_norm_epsilon
        # h = wte[ids] + wpe[pos], the add fused into the first LayerNorm
        first = w.layers[0]
        x, h = ops.layer_norm(w.wte[input_ids], first.ln_1_weight, first.ln_1_bias, eps, residual=w.wpe[positions])
        for i, layer in enumerate(w.layers):
            if i > 0:
                x, _ = ops.layer_norm(h, layer.ln_1_weight, layer.ln_1_bias, eps)
            lora = self.lora[i] if slots is not None else (None,) * 4
            qkv = self._linear(x, layer.attn_weight, layer.attn_bias, lora[0], slots)  # (T, 3D)
            q, k, v = qkv.view(T, 3, H, hd).unbind(1)  # each (T, H, hd), strided views: no copy
            a = attend(q, k, v, i)  # (T, H, hd); stores k, v in the paged cache
            a = a.view(T, H * hd)
            h = self._linear(a, layer.attn_proj_weight, layer.attn_proj_bias, lora[1], slots, residual=h)
            x, _ = ops.layer_norm(h, layer.ln_2_weight, layer.ln_2_bias, eps)
            m = self._linear(x, layer.fc_weight, layer.fc_bias, lora[2], slots, activation="gelu_tanh")  # (T, d_ff)
            h = self._linear(m, layer.mlp_proj_weight, layer.mlp_proj_bias, lora[3], slots, residual=h)
        return h

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """ln_f: the last hidden state (transformers' ``last_hidden_state``)."""
        return self.ops.layer_norm(h, self.w.ln_f_weight, self.w.ln_f_bias, self.config.layer_norm_epsilon)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head (tied to wte): ``[M, D]`` final hidden states -> fp32 ``[M, V]``."""
        return self.ops.linear(hidden, self.lm_head).float()

    @torch.inference_mode()
    def prefill(self, batch: PrefillBatch, kv: KVCache, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states of the packed prompts, ``[T, D]``, or only of ``rows`` when given."""

        def attend(q, k, v, layer):  # K/V go to the cache within the attention call (in the same pass on Triton)
            cache = (kv.k[layer], kv.v[layer], batch.slot_mapping)
            return self.ops.prefill_attention(
                q, k, v, batch.cu_seqlens, batch.max_seqlen, self.scales[layer], kv_cache=cache
            )

        h = self._forward(batch.input_ids, batch.positions, attend, batch.lora_slots)
        return self.final_norm(h if rows is None else h[rows])

    @torch.inference_mode()
    def decode(self, batch: DecodeBatch, kv: KVCache) -> torch.Tensor:
        """Final hidden state of each sequence's new token, ``[B, D]``."""

        def attend(q, k, v, layer):  # store this token's K/V first: it attends to itself
            self.ops.store_kv(k, v, kv.k[layer], kv.v[layer], batch.slot_mapping)
            return self.ops.decode_attention(
                q,
                kv.k[layer],
                kv.v[layer],
                batch.block_tables,
                batch.context_lens,
                batch.max_context_len,
                self.scales[layer],
            )

        h = self._forward(batch.input_ids, batch.positions, attend, batch.lora_slots)
        return self.final_norm(h)

    @torch.inference_mode()
    def extend(self, batch: ExtendBatch, kv: KVCache, rows: torch.Tensor) -> torch.Tensor:
        """Final hidden states of ``rows`` of a mixed step, ``[len(rows), D]``."""
        nd = batch.num_decodes

        def attend(q, k, v, layer):
            k_cache, v_cache = kv.k[layer], kv.v[layer]
            self.ops.store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
            parts = []
            if nd:  # the split-K decode kernel for the one-token queries
                tables, lens = batch.block_tables[:nd], batch.seq_lens[:nd]
                parts.append(
                    self.ops.decode_attention(
                        q[:nd], k_cache, v_cache, tables, lens, batch.max_decode_len, self.scales[layer]
                    )
                )
            if nd < batch.seq_lens.shape[0]:
                parts.append(
                    self.ops.context_attention(
                        q[nd:],
                        k_cache,
                        v_cache,
                        batch.chunk_cu_seqlens,
                        batch.seq_lens[nd:],
                        batch.block_tables[nd:],
                        batch.max_chunk_len,
                        batch.max_seq_len,
                        self.scales[layer],
                    )  # fmt: skip
                )
            return torch.cat(parts) if len(parts) > 1 else parts[0]

        h = self._forward(batch.input_ids, batch.positions, attend, batch.lora_slots)
        return self.final_norm(h[rows])
