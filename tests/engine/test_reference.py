"""The float64 reference model against transformers' GPT2LMHeadModel run in float64 on the same checkpoint."""

from __future__ import annotations

import pytest
import torch

from engine.config import ModelConfig
from engine.loader import load_checkpoint
from engine.reference import ReferenceGPT2
from engine.weights import random_weights
from tests.helpers import make_hf_model, rel_err, save_checkpoint

SMALL = dict(vocab_size=211, n_positions=48)

# Each config exercises a field the reference must honour; all pass through config.json and the loader.
CONFIGS = {
    "default": {},
    "inverse-layer-scale+n_inner": dict(scale_attn_by_inverse_layer_idx=True, n_inner=72, n_layer=3),
    "no-scale+eps": dict(scale_attn_weights=False, layer_norm_epsilon=1e-2),
    "untied-head": dict(tie_word_embeddings=False),
    "odd-heads": dict(n_embd=60, n_head=5, n_inner=100, activation_function="gelu_pytorch_tanh"),
    "gelu_fast": dict(activation_function="gelu_fast", reorder_and_upcast_attn=True),
}
TOL = 1e-10


@pytest.mark.parametrize("length", [1, 7, 48])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_matches_transformers(tmp_path, name, length):
    hf = make_hf_model(**{**SMALL, **CONFIGS[name]})
    save_checkpoint(hf, tmp_path)
    config, weights = load_checkpoint(tmp_path, torch.float32, "cpu", progress=False)
    ref = ReferenceGPT2(config, weights)

    ids = torch.randint(0, config.vocab_size, (length,))
    hidden, logits = ref.forward(ids.tolist())
    assert hidden.dtype == logits.dtype == torch.float64
    assert hidden.shape == (length, config.n_embd) and logits.shape == (length, config.vocab_size)

    hf = hf.double()
    with torch.no_grad():
        out = hf(ids[None], output_hidden_states=True)
    assert rel_err(hidden, out.hidden_states[-1][0]) < TOL
    assert rel_err(logits, out.logits[0]) < TOL


def test_reference_is_causal():
    """Appending tokens never changes earlier positions' outputs."""
    config = ModelConfig(**SMALL, n_embd=32, n_layer=2, n_head=4)
    ref = ReferenceGPT2(config, random_weights(config, torch.float32, "cpu"))
    ids = torch.randint(0, config.vocab_size, (20,)).tolist()
    hidden_short, logits_short = ref(ids[:9])
    hidden_long, logits_long = ref(ids)
    assert rel_err(hidden_long[:9], hidden_short) < 1e-14 and rel_err(logits_long[:9], logits_short) < 1e-14
    assert rel_err(hidden_long[9:12], hidden_short[:3]) > 1e-3  # later positions really differ


def test_reference_copies_weights():
    config = ModelConfig(**SMALL, n_embd=32, n_layer=1, n_head=2)
    weights = random_weights(config, torch.float32, "cpu")
    ref = ReferenceGPT2(config, weights)
    ids = torch.randint(0, config.vocab_size, (5,)).tolist()
    before = ref(ids)[1]
    weights.layers[0].fc_weight.mul_(3)  # the caller's weights change; the oracle's don't
    assert torch.equal(ref(ids)[1], before)


def test_reference_rejects_bad_input():
    config = ModelConfig(**SMALL, n_embd=32, n_layer=1, n_head=2)
    weights = random_weights(config, torch.float32, "cpu")
    ref = ReferenceGPT2(config, weights)
    with pytest.raises(ValueError, match="ids: length 0"):
        ref([])
    with pytest.raises(ValueError, match="n_positions=48"):
        ref([1] * 49)
    with pytest.raises(ValueError, match="vocab_size=211"):
        ref([3, 211])
    with pytest.raises(ValueError, match="vocab_size"):
        ref([-1])
    weights.map_linear(lambda w: ("prepared", w))
    with pytest.raises(ValueError, match=r"layers\.0\.attn_weight is not a tensor"):
        ReferenceGPT2(config, weights)
    with pytest.raises(ValueError, match="n_layer=2"):
        ReferenceGPT2(
            ModelConfig(**SMALL, n_embd=32, n_layer=2, n_head=2), random_weights(config, torch.float32, "cpu")
        )
