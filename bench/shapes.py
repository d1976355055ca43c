"""GPT-2's sizes as the benchmarks use them: Medium's on a GPU, tiny ones for the interpreter's dry runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layer:
    """One linear layer of a GPT-2 block (or the LM head): ``act(x @ W.T + bias) + residual``, ``W [N, K]``."""

    name: str
    k: int
    n: int
    bias: bool
    activation: str | None
    residual: bool


@dataclass(frozen=True)
class Model:
    """The dimensions the kernels see."""

    d: int
    heads: int
    head_dim: int
    d_ff: int
    vocab: int
    block_size: int = 16  # tokens per paged-KV block (the engine's default)

    def layers(self) -> list[Layer]:
        d, f = self.d, self.d_ff
        return [
            Layer("qkv", d, 3 * d, True, None, False),
            Layer("attn_out+res", d, d, True, None, True),
            Layer("fc+gelu", d, f, True, "gelu_tanh", False),
            Layer("mlp_out+res", f, d, True, None, True),
            Layer("lm_head", d, self.vocab, False, None, False),
        ]

    def layer(self, name: str) -> Layer:
        by_name = {layer.name: layer for layer in self.layers()}
        if name not in by_name:
            raise ValueError(f"unknown layer {name!r}; expected one of {list(by_name)}")
        return by_name[name]


MEDIUM = Model(d=1024, heads=16, head_dim=64, d_ff=4096, vocab=50257)
TINY = Model(d=128, heads=2, head_dim=64, d_ff=256, vocab=1000)  # the interpreter's dry runs


def model_for(dry_run: bool) -> Model:
    return TINY if dry_run else MEDIUM
