"""GPT-2's parameters as plain tensors, in the layout every backend computes with.

Linear weights are ``[N, K]`` (``nn.Linear``'s ``[out, in]``): the loader transposes Hugging Face's Conv1D
``[in, out]`` weights once, so no step ever transposes. Backends may re-lay out or quantize the four block
linear weights once through :meth:`GPT2Weights.map_linear`; everything else stays a tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace

import torch

from engine.config import ModelConfig

# The block weights that are matrices multiplied by activations (what map_linear touches).
LINEAR_FIELDS = ("attn_weight", "attn_proj_weight", "fc_weight", "mlp_proj_weight")


@dataclass
class LayerWeights:
    """One transformer block (D = n_embd, F = d_ff)."""

    ln_1_weight: torch.Tensor  # [D]
    ln_1_bias: torch.Tensor  # [D]
    attn_weight: torch.Tensor  # [3D, D]  fused q, k, v projection (rows: q then k then v)
    attn_bias: torch.Tensor  # [3D]
    attn_proj_weight: torch.Tensor  # [D, D]  attention output projection
    attn_proj_bias: torch.Tensor  # [D]
    ln_2_weight: torch.Tensor  # [D]
    ln_2_bias: torch.Tensor  # [D]
    fc_weight: torch.Tensor  # [F, D]  MLP up-projection
    fc_bias: torch.Tensor  # [F]
    mlp_proj_weight: torch.Tensor  # [D, F]  MLP down-projection
    mlp_proj_bias: torch.Tensor  # [D]


@dataclass
class GPT2Weights:
    """All parameters of a GPT-2 LM (V = vocab_size, P = n_positions, D = n_embd)."""

    wte: torch.Tensor  # [V, D]  token embedding; also the LM head unless lm_head is set
    wpe: torch.Tensor  # [P, D]  position embedding
    layers: list[LayerWeights]
    ln_f_weight: torch.Tensor  # [D]
    ln_f_bias: torch.Tensor  # [D]
    lm_head: torch.Tensor | None = None  # [V, D]; only for tie_word_embeddings=False checkpoints

    @property
    def head(self) -> torch.Tensor:
        """The LM head weight ``[V, D]``: the untied head if there is one, else ``wte``."""
        return self.wte if self.lm_head is None else self.lm_head

    def map_linear(self, fn: Callable[[torch.Tensor], object]) -> None:
        """Replace every block linear weight ``w`` by ``fn(w)`` in place (a backend's one-time re-layout)."""
        for layer in self.layers:
            for name in LINEAR_FIELDS:
                setattr(layer, name, fn(getattr(layer, name)))

    def named_tensors(self) -> Iterator[tuple[str, object]]:
        """Yield ``(name, value)`` for every parameter, block ones named ``layers.{i}.{field}``."""
        for name in ("wte", "wpe", "ln_f_weight", "ln_f_bias", "lm_head"):
            value = getattr(self, name)
            if value is not None:
                yield name, value
        for i, layer in enumerate(self.layers):
            for f in fields(layer):
                yield f"layers.{i}.{f.name}", getattr(layer, f.name)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> GPT2Weights:
        """A copy on ``device`` (and cast to floating ``dtype`` if given); tensors already there are shared."""

        def move(value: object) -> object:
            if isinstance(value, torch.Tensor):
                return value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            if hasattr(value, "to"):  # a backend's prepared weight that knows how to move itself
                return value.to(device)
            raise TypeError(f"cannot move weight of type {type(value).__name__}")

        layers = [
            LayerWeights(**{f.name: move(getattr(layer, f.name)) for f in fields(layer)}) for layer in self.layers
        ]
        return replace(
            self,
            wte=move(self.wte),
            wpe=move(self.wpe),
            layers=layers,
            ln_f_weight=move(self.ln_f_weight),
            ln_f_bias=move(self.ln_f_bias),
            lm_head=None if self.lm_head is None else move(self.lm_head),
        )


def random_weights(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int | None = None,
) -> GPT2Weights:
    """GPT-2-like random weights for ``load_format="dummy"``: benchmarks and tests without any files.

    Init follows GPT-2 / nanoGPT: normal(0, 0.02) matrices, the two residual projections scaled by
    1/sqrt(2 n_layer), LayerNorm weights near 1; biases and LN biases are small random rather than zero so
    that every parameter affects the output. ``seed`` makes it reproducible on a given device.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # drawn from the global RNG, so torch.manual_seed applies
    gen.manual_seed(seed)
    d, f, v, p = config.n_embd, config.d_ff, config.vocab_size, config.n_positions
    proj_std = 0.02 / math.sqrt(2 * config.n_layer)

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device).normal_(mean, std, generator=gen)

    layers = [
        LayerWeights(
            ln_1_weight=normal(d, std=0.02, mean=1.0),
            ln_1_bias=normal(d, std=0.02),
            attn_weight=normal(3 * d, d, std=0.02),
            attn_bias=normal(3 * d, std=0.02),
            attn_proj_weight=normal(d, d, std=proj_std),
            attn_proj_bias=normal(d, std=0.02),
            ln_2_weight=normal(d, std=0.02, mean=1.0),
            ln_2_bias=normal(d, std=0.02),
            fc_weight=normal(f, d, std=0.02),
            fc_bias=normal(f, std=0.02),
            mlp_proj_weight=normal(d, f, std=proj_std),
            mlp_proj_bias=normal(d, std=0.02),
        )
        for _ in range(config.n_layer)
    ]
    return GPT2Weights(
        wte=normal(v, d, std=0.02),
        wpe=normal(p, d, std=0.01),
        layers=layers,
        ln_f_weight=normal(d, std=0.02, mean=1.0),
        ln_f_bias=normal(d, std=0.02),
        lm_head=None if config.tie_word_embeddings else normal(v, d, std=0.02),
    )
