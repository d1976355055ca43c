"""GPT-2 model configuration: read from a Hugging Face ``config.json`` or a named preset, validated once.

Every ``config.json`` field that changes the math is either implemented here or rejected by name; fields
that only matter for training (dropout) or other heads (``summary_*``) are ignored on purpose.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

# Published sizes of the GPT-2 family (Radford et al. 2019, Table 2; Hugging Face's config.json files).
PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
}

# All tanh approximations of GELU; they agree to float32 rounding.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

# Fields whose values we implement only in their default form: anything else is refused by name.
_REQUIRE = {
    "add_cross_attention": False,
    "is_encoder_decoder": False,
}


@dataclass(frozen=True)
class ModelConfig:
    """The hyper-parameters that define a GPT-2 forward pass."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 1024
    n_layer: int = 24
    n_head: int = 16
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False  # upcasts attention scores to fp32: we always do, so it is a no-op
    tie_word_embeddings: bool = True
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_inner is not None and (type(self.n_inner) is not int or self.n_inner <= 0):
            raise ValueError(f"config field n_inner must be a positive integer or null, got {self.n_inner!r}")
        if self.activation_function not in TANH_GELUS:
            raise ValueError(
                f"config: activation_function={self.activation_function!r} is not supported "
                f"(supported: {', '.join(TANH_GELUS)})"
            )
        for name in (
            "scale_attn_weights",
            "scale_attn_by_inverse_layer_idx",
            "reorder_and_upcast_attn",
            "tie_word_embeddings",
        ):
            if not isinstance(getattr(self, name), bool):  # a JSON string "false" would otherwise read as true
                raise ValueError(f"config field {name} must be true or false, got {getattr(self, name)!r}")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"config field layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def d_ff(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def attn_scale(self, layer: int) -> float:
        """Softmax scale of layer ``layer`` (0-based), following the config's two scaling switches."""
        scale = 1.0 / math.sqrt(self.head_dim) if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= layer + 1
        return scale

    def num_parameters(self) -> int:
        d, f = self.n_embd, self.d_ff
        per_layer = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_positions * d + self.n_layer * per_layer + 2 * d + lm_head

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> ModelConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"{source}: model_type={model_type!r} is not GPT-2")
        for name, wanted in _REQUIRE.items():
            if name in raw and raw[name] != wanted:
                raise ValueError(f"{source}: {name}={raw[name]!r} is not supported")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known and v is not None}
        # Older checkpoints name the context n_ctx; it must agree with n_positions when both are given.
        if "n_ctx" in raw and "n_positions" in raw and raw["n_ctx"] != raw["n_positions"]:
            raise ValueError(f"{source}: n_ctx={raw['n_ctx']} disagrees with n_positions={raw['n_positions']}")
        if "n_positions" not in raw and "n_ctx" in raw:
            kwargs["n_positions"] = raw["n_ctx"]
        if "n_inner" in raw:
            kwargs["n_inner"] = raw["n_inner"]
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        except TypeError as e:  # a field of the wrong JSON type
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: config file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        key = name.split("/")[-1]
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        return cls(**PRESETS[key])
