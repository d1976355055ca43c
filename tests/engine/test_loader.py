"""Checkpoint loading (both hub key layouts, shards, dtypes), its error messages, dummy weights, ModelConfig."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import ModelConfig
from engine.loader import load_checkpoint, resolve_model
from engine.weights import LINEAR_FIELDS, GPT2Weights, random_weights
from tests.helpers import make_hf_model, save_checkpoint

# Small vocabulary and context keep every file copy and rewrite in these tests cheap.
SMALL = dict(vocab_size=503, n_positions=64)

# HF parameter name -> (our attribute path, is it a Conv1D weight stored [in, out]).
BLOCK = {
    "ln_1.weight": ("ln_1_weight", False),
    "ln_1.bias": ("ln_1_bias", False),
    "attn.c_attn.weight": ("attn_weight", True),
    "attn.c_attn.bias": ("attn_bias", False),
    "attn.c_proj.weight": ("attn_proj_weight", True),
    "attn.c_proj.bias": ("attn_proj_bias", False),
    "ln_2.weight": ("ln_2_weight", False),
    "ln_2.bias": ("ln_2_bias", False),
    "mlp.c_fc.weight": ("fc_weight", True),
    "mlp.c_fc.bias": ("fc_bias", False),
    "mlp.c_proj.weight": ("mlp_proj_weight", True),
    "mlp.c_proj.bias": ("mlp_proj_bias", False),
}


def _seeded_model(**overrides):
    torch.manual_seed(random.SystemRandom().randrange(2**31))
    return make_hf_model(**{**SMALL, **overrides})


@pytest.fixture(scope="module")
def model():
    """A small random GPT2LMHeadModel (tied head)."""
    return _seeded_model()


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory, model):
    """``model`` as written by save_pretrained (transformer. prefix, tied lm_head left out)."""
    return save_checkpoint(model, tmp_path_factory.mktemp("good"))


@pytest.fixture
def bad_dir(tmp_path, good_dir):
    """A private copy of ``good_dir`` for a test to damage."""
    return Path(shutil.copytree(good_dir, tmp_path / "ckpt"))


def expect_equal(weights: GPT2Weights, hf_model, dtype: torch.dtype) -> None:
    """Every loaded tensor equals the HF parameter cast to ``dtype`` (Conv1D ones transposed), contiguous."""
    sd = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
    pairs = [(weights.wte, sd["wte.weight"]), (weights.wpe, sd["wpe.weight"])]
    pairs += [(weights.ln_f_weight, sd["ln_f.weight"]), (weights.ln_f_bias, sd["ln_f.bias"])]
    for i, layer in enumerate(weights.layers):
        for name, (field, conv1d) in BLOCK.items():
            ref = sd[f"h.{i}.{name}"]
            pairs.append((getattr(layer, field), ref.t() if conv1d else ref))
    if weights.lm_head is not None:
        pairs.append((weights.lm_head, sd["lm_head.weight"]))
    for got, ref in pairs:
        assert got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got, ref.to(dtype)), "loaded tensor differs from the HF parameter"


# ---------------------------------------------------------------------------------------------------------
# Loading good checkpoints


@pytest.mark.parametrize("layout", ["save_pretrained", "published", "sharded"])
def test_load_layouts(tmp_path, model, layout):
    if layout == "sharded":
        model.save_pretrained(tmp_path, max_shard_size="100KB")
        assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    else:
        save_checkpoint(model, tmp_path, published_layout=layout == "published")
    config, weights = load_checkpoint(tmp_path, torch.float32, "cpu", progress=False)
    assert config.n_embd == model.config.n_embd and config.n_layer == model.config.n_layer
    assert config.vocab_size == model.config.vocab_size and len(weights.layers) == config.n_layer
    assert weights.lm_head is None
    expect_equal(weights, model, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_load_casts_once(good_dir, model, dtype):
    _, weights = load_checkpoint(good_dir, dtype, torch.device("cpu"), progress=False)
    expect_equal(weights, model, dtype)


def test_tied_lm_head_stored_and_equal(tmp_path, model):
    save_checkpoint(model, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    save_file(sd, tmp_path / "model.safetensors")
    _, weights = load_checkpoint(tmp_path, torch.float32, "cpu", progress=False)
    assert weights.lm_head is None
    expect_equal(weights, model, torch.float32)


def test_untied_lm_head(tmp_path):
    untied = _seeded_model(tie_word_embeddings=False)
    save_checkpoint(untied, tmp_path)
    config, weights = load_checkpoint(tmp_path, torch.float32, "cpu", progress=False)
    assert not config.tie_word_embeddings and weights.lm_head is not None
    assert not torch.equal(weights.lm_head, weights.wte) and weights.head is weights.lm_head
    expect_equal(weights, untied, torch.float32)


def test_tied_config_but_different_head_rejected(tmp_path):
    save_checkpoint(_seeded_model(tie_word_embeddings=False), tmp_path)
    _edit_config(tmp_path, tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from transformer\.wte\.weight.*tie_word_embeddings"):
        load_checkpoint(tmp_path, torch.float32, "cpu", progress=False)


def test_untied_config_without_head_rejected(bad_dir):
    _edit_config(bad_dir, tie_word_embeddings=False)
    with pytest.raises(ValueError, match=r"missing tensor\(s\) lm_head\.weight.*tie_word_embeddings=false"):
        load_checkpoint(bad_dir, torch.float32, "cpu", progress=False)


def test_progress_bar_on_stderr(good_dir, capsys):
    load_checkpoint(good_dir, torch.float32, "cpu", progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "loading" in err
    load_checkpoint(good_dir, torch.float32, "cpu", progress=False)
    assert capsys.readouterr() == ("", "")


def test_bad_dtype_rejected(good_dir):
    with pytest.raises(ValueError, match="dtype"):
        load_checkpoint(good_dir, torch.int8, "cpu", progress=False)


# ---------------------------------------------------------------------------------------------------------
# Bad checkpoints: one clear ValueError naming the file or tensor


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(directory: Path, fn) -> None:
    path = directory / "model.safetensors"
    sd = load_file(path)
    fn(sd)
    save_file(sd, path, metadata={"format": "pt"})


def _truncate(directory: Path) -> None:
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _only_bin(directory: Path) -> None:
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not read: we never unpickle")


def _shard_missing(directory: Path) -> None:
    (directory / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def _index_not_json(directory: Path) -> None:
    (directory / "model.safetensors").unlink()
    (directory / "model.safetensors.index.json").write_text("{weight_map: nope")


def _index_wrong_shard(directory: Path) -> None:
    sd = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    first = {k: v for k, v in sd.items() if ".h.1." not in k}
    second = {k: v for k, v in sd.items() if ".h.1." in k}
    save_file(first, directory / "a.safetensors")
    save_file(second, directory / "b.safetensors")
    weight_map = {k: "a.safetensors" for k in sd}  # wrong for layer 1
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _corrupt_header(directory: Path) -> None:
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"#garbage"
    path.write_bytes(bytes(data))


def _nan(sd):
    sd["transformer.h.0.mlp.c_fc.weight"][3, 5] = float("nan")


BAD = {
    "no config.json": (lambda d: (d / "config.json").unlink(), r"config\.json"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{not json"), r"config\.json: not valid JSON"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), r"no model\.safetensors"),
    "only pickle": (_only_bin, r"pytorch_model\.bin.*pickle.*refused.*safetensors"),
    "index names missing shard": (_shard_missing, r"index\.json: names shard model-00001-of-00002\.safetensors"),
    "index not JSON": (_index_not_json, r"model\.safetensors\.index\.json: not a safetensors index"),
    "index names wrong shard": (
        _index_wrong_shard,
        r"lists tensor transformer\.h\.1\.\S+ in a\.safetensors, but a\.safetensors does not hold it",
    ),
    "truncated": (_truncate, r"model\.safetensors: not a readable safetensors file"),
    "corrupt header": (_corrupt_header, r"model\.safetensors: not a readable safetensors file"),
    "missing tensor": (
        lambda d: _edit_tensors(d, lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias")),
        r"missing tensor\(s\) h\.1\.mlp\.c_fc\.bias",
    ),
    "wrong shape": (
        lambda d: _edit_tensors(d, lambda sd: sd.update({"transformer.h.0.attn.c_proj.bias": torch.randn(63)})),
        r"tensor transformer\.h\.0\.attn\.c_proj\.bias has shape \[63\], expected \[64\]",
    ),
    "transposed Conv1D": (
        lambda d: _edit_tensors(d, lambda sd: sd.update({"transformer.h.1.mlp.c_fc.weight": torch.randn(256, 64)})),
        r"transformer\.h\.1\.mlp\.c_fc\.weight has shape \[256, 64\], expected \[64, 256\]",
    ),
    "config n_embd disagrees": (
        lambda d: _edit_config(d, n_embd=128),
        r"tensor transformer\.wte\.weight has shape \[503, 64\], expected \[503, 128\]"
        r".*dim 1 is 64 but config\.json has n_embd=128",
    ),
    "config n_inner disagrees": (
        lambda d: _edit_config(d, n_inner=100),
        r"h\.0\.mlp\.c_fc\.weight has shape \[64, 256\].*n_inner=100",
    ),
    "config vocab disagrees": (lambda d: _edit_config(d, vocab_size=500), r"wte\.weight.*vocab_size=500"),
    "config n_layer too small": (lambda d: _edit_config(d, n_layer=1), r"weights for layer\(s\) 1 .*n_layer=1"),
    "config n_layer too large": (
        lambda d: _edit_config(d, n_layer=3),
        r"missing tensor\(s\) h\.2\.attn.*has 2 layers but config\.json has n_layer=3",
    ),
    "unknown tensor": (
        lambda d: _edit_tensors(
            d, lambda sd: sd.update({"transformer.h.0.crossattention.c_attn.weight": torch.ones(2)})
        ),
        r"unexpected tensor\(s\) transformer\.h\.0\.crossattention\.c_attn\.weight",
    ),
    "integer weights": (
        lambda d: _edit_tensors(d, lambda sd: sd.update({"transformer.ln_f.bias": torch.ones(64, dtype=torch.int8)})),
        r"ln_f\.bias is stored as I8",
    ),
    "duplicate names": (
        lambda d: _edit_tensors(d, lambda sd: sd.update({"wpe.weight": sd["transformer.wpe.weight"].clone()})),
        r"wpe\.weight is also stored as",
    ),
    "NaN weights": (lambda d: _edit_tensors(d, _nan), r"h\.0\.mlp\.c_fc\.weight has non-finite values"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint(bad_dir, case):
    damage, message = BAD[case]
    damage(bad_dir)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(bad_dir, torch.float32, "cpu", progress=False)


def test_missing_or_file_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", torch.float32, "cpu")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        load_checkpoint(tmp_path / "file", torch.float32, "cpu")


# ---------------------------------------------------------------------------------------------------------
# resolve_model: local directories and the hub (network faked)


def test_resolve_local(good_dir, tmp_path, monkeypatch):
    assert resolve_model(good_dir) == good_dir
    assert resolve_model(str(good_dir)) == good_dir
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model("./no/such/dir")
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        resolve_model(tmp_path / "f")
    # A local directory wins over the hub id of the same name.
    monkeypatch.chdir(good_dir.parent)
    assert resolve_model(good_dir.name) == Path(good_dir.name)


class FakeHub:
    """Stands in for huggingface_hub.snapshot_download: records calls; cache and network are switches."""

    def __init__(self, cached: Path | None, online: Path | None):
        self.cached, self.online, self.calls = cached, online, []

    def __call__(self, repo_id, allow_patterns=None, local_files_only=False):
        self.calls.append((repo_id, tuple(allow_patterns), local_files_only))
        found = self.cached if local_files_only else self.online
        if found is None:
            raise OSError("offline" if not local_files_only else "not in cache")
        return str(found)


@pytest.mark.parametrize(
    ("name", "repo_id"),
    [("gpt2-medium", "openai-community/gpt2-medium"), ("openai-community/gpt2-xl", "openai-community/gpt2-xl")],
)
@pytest.mark.parametrize("cached", [True, False])
def test_resolve_hub(good_dir, monkeypatch, tmp_path, name, repo_id, cached):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.chdir(tmp_path)  # so no local directory shadows the hub id
    fake = FakeHub(cached=good_dir if cached else None, online=good_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_model(name) == good_dir
    assert [c[0] for c in fake.calls] == [repo_id] * len(fake.calls)
    assert [c[2] for c in fake.calls] == ([True] if cached else [True, False])
    patterns = fake.calls[0][1]
    for needed in ("config.json", "*.safetensors", "model.safetensors.index.json", "vocab.json", "merges.txt"):
        assert needed in patterns
    assert not any("bin" in p for p in patterns)


def test_resolve_hub_offline_not_cached(monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(cached=None, online=None))
    with pytest.raises(ValueError, match=r"could not fetch model 'openai-community/gpt2'.*local directory.*dummy"):
        resolve_model("gpt2")


def test_resolve_hub_without_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(ValueError, match=r"huggingface_hub is not installed.*dummy"):
        resolve_model("gpt2-large")


# ---------------------------------------------------------------------------------------------------------
# Dummy weights and the weights container


@pytest.mark.parametrize(
    ("preset", "count"),
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_preset_parameter_counts(preset, count):
    assert ModelConfig.preset(preset).num_parameters() == count
    assert ModelConfig.preset(f"openai-community/{preset}").num_parameters() == count


TINY_CONFIGS = [
    dict(vocab_size=97, n_positions=16, n_embd=48, n_layer=3, n_head=6),
    dict(vocab_size=31, n_positions=7, n_embd=32, n_layer=1, n_head=2, n_inner=40, tie_word_embeddings=False),
]


@pytest.mark.parametrize("fields", TINY_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_random_weights(fields, dtype):
    config = ModelConfig(**fields)
    w = random_weights(config, dtype, "cpu", seed=1234)
    d, f, v, p = config.n_embd, config.d_ff, config.vocab_size, config.n_positions
    assert w.wte.shape == (v, d) and w.wpe.shape == (p, d) and len(w.layers) == config.n_layer
    assert (w.lm_head is None) == config.tie_word_embeddings
    layer = w.layers[0]
    assert layer.attn_weight.shape == (3 * d, d) and layer.attn_proj_weight.shape == (d, d)
    assert layer.fc_weight.shape == (f, d) and layer.mlp_proj_weight.shape == (d, f)
    tensors = [t for _, t in w.named_tensors()]
    assert all(t.dtype == dtype and torch.isfinite(t).all() for t in tensors)
    assert sum(t.numel() for t in tensors) == config.num_parameters()
    assert all(t.float().std() > 0 for t in tensors if t.numel() > 1)  # nothing left at a constant
    assert 0.5 < layer.ln_1_weight.float().mean() < 1.5 and layer.attn_bias.float().abs().max() < 0.2
    # Reproducible for a seed, different across seeds.
    again, other = random_weights(config, dtype, "cpu", seed=1234), random_weights(config, dtype, "cpu", seed=1235)
    assert torch.equal(again.layers[-1].fc_weight, w.layers[-1].fc_weight)
    assert not torch.equal(other.layers[-1].fc_weight, w.layers[-1].fc_weight)


def test_map_linear_and_to():
    config = ModelConfig(**TINY_CONFIGS[0])
    w = random_weights(config, torch.float32, "cpu")
    before = {name: t for name, t in w.named_tensors()}
    seen = []
    w.map_linear(lambda t: seen.append(t.shape) or t * 2)
    assert len(seen) == 4 * config.n_layer
    for name, t in w.named_tensors():
        factor = 2 if name.split(".")[-1] in LINEAR_FIELDS else 1
        assert torch.equal(t, before[name] * factor), name
    half = w.to("cpu", torch.float16)
    assert all(t.dtype == torch.float16 for _, t in half.named_tensors())
    assert w.wte.dtype == torch.float32  # the original is untouched


# ---------------------------------------------------------------------------------------------------------
# ModelConfig


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("activation_function", "relu"),
        ("add_cross_attention", True),
        ("model_type", "gpt_neo"),
        ("n_embd", 65),  # not divisible by n_head
        ("tie_word_embeddings", "false"),
        ("n_inner", 0),
        ("layer_norm_epsilon", -1.0),
    ],
)
def test_config_rejects_unsupported(field, value):
    raw = {**SMALL, "n_embd": 64, "n_layer": 2, "n_head": 4, field: value}
    with pytest.raises(ValueError, match=rf"cfg\.json: .*{field}"):
        ModelConfig.from_dict(raw, source="cfg.json")


def test_config_attn_scale_and_fields():
    config = ModelConfig.from_dict(
        {"n_embd": 64, "n_head": 4, "n_layer": 3, "scale_attn_by_inverse_layer_idx": True, "n_inner": 100, "n_ctx": 32}
    )
    assert [config.attn_scale(i) for i in range(3)] == pytest.approx([0.25, 0.125, 0.25 / 3], rel=1e-15)
    assert config.d_ff == 100 and config.n_positions == 32
    assert ModelConfig(n_embd=64, n_head=4, scale_attn_weights=False).attn_scale(5) == 1.0
    assert ModelConfig(n_embd=64, n_head=4).d_ff == 256
