"""A deliberately simple float64 GPT-2: the in-project parity oracle.

Full recompute of one sequence, no KV cache, no fusion, no batching: each line is one equation of the
GPT-2 forward pass (Radford et al. 2019; nanoGPT's ``model.py``), so it can be checked by reading it.
Every supported config field is honoured: per-layer attention scale, LayerNorm epsilon, MLP width
(``n_inner``) and an untied LM head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from engine.config import ModelConfig
from engine.weights import GPT2Weights


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with biased variance, as nn.LayerNorm computes it."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU (``gelu_new``): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class ReferenceGPT2:
    """GPT-2 forward pass in float64 on the CPU, one sequence at a time."""

    def __init__(self, config: ModelConfig, weights: GPT2Weights) -> None:
        mapped = [name for name, t in weights.named_tensors() if not isinstance(t, torch.Tensor)]
        if mapped:
            raise ValueError(f"weights: {mapped[0]} is not a tensor; pass the weights before a backend's map_linear")
        self.config = config
        self.w = weights.to("cpu", torch.float64)  # a float64 copy (read only, so sharing float64 CPU input is fine)
        if len(self.w.layers) != config.n_layer:
            raise ValueError(f"weights have {len(self.w.layers)} layers but config n_layer={config.n_layer}")

    @torch.no_grad()
    def forward(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[T]`` -> (hidden state after ln_f ``[T, D]``, logits ``[T, V]``), both float64."""
        cfg, w = self.config, self.w
        ids = [int(i) for i in ids]
        T, D, H = len(ids), cfg.n_embd, cfg.n_head
        hd = D // H
        if not 1 <= T <= cfg.n_positions:
            raise ValueError(f"ids: length {T} must be in [1, n_positions={cfg.n_positions}]")
        if min(ids) < 0 or max(ids) >= cfg.vocab_size:
            raise ValueError(f"ids: token ids must be in [0, vocab_size={cfg.vocab_size}), got {min(ids)}..{max(ids)}")
        eps = cfg.layer_norm_epsilon
        causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T): query t sees keys 0..t

        x = w.wte[torch.tensor(ids)] + w.wpe[:T]  # (T, D)
        for i, layer in enumerate(w.layers):
            # --- attention ---
            h = layer_norm(x, layer.ln_1_weight, layer.ln_1_bias, eps)  # (T, D)
            qkv = h @ layer.attn_weight.T + layer.attn_bias  # (T, 3D)
            q, k, v = qkv.split(D, dim=1)  # each (T, D)
            q = q.view(T, H, hd).transpose(0, 1)  # (H, T, hd)
            k = k.view(T, H, hd).transpose(0, 1)  # (H, T, hd)
            v = v.view(T, H, hd).transpose(0, 1)  # (H, T, hd)
            att = (q @ k.transpose(1, 2)) * cfg.attn_scale(i)  # (H, T, T)
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)  # (H, T, T)
            y = (att @ v).transpose(0, 1).reshape(T, D)  # (T, D): heads side by side
            x = x + y @ layer.attn_proj_weight.T + layer.attn_proj_bias  # (T, D)
            # --- MLP ---
            h = layer_norm(x, layer.ln_2_weight, layer.ln_2_bias, eps)  # (T, D)
            h = gelu_tanh(h @ layer.fc_weight.T + layer.fc_bias)  # (T, F)
            x = x + h @ layer.mlp_proj_weight.T + layer.mlp_proj_bias  # (T, D)

        hidden = layer_norm(x, w.ln_f_weight, w.ln_f_bias, eps)  # (T, D)
        logits = hidden @ w.head.T  # (T, V): tied to wte unless the checkpoint has its own head
        return hidden, logits

    __call__ = forward
