"""Find a GPT-2 checkpoint (local directory or Hugging Face hub id) and load it into :class:`GPT2Weights`.

Only safetensors are read (memory-mapped, never unpickled). Both key layouts on the hub are accepted:
the published ``openai-community/gpt2*`` files (no ``transformer.`` prefix, attention-mask buffers stored,
no ``lm_head``) and what ``GPT2LMHeadModel.save_pretrained`` writes (``transformer.`` prefix, the tied
``lm_head.weight`` present or not). Conv1D weights are stored ``[in, out]`` and transposed here, once.

Every tensor is checked against an explicit list built from the config (nanoGPT style). Tensors that are
neither on that list nor a known buffer are refused by name: they mean a variant we do not implement
(cross-attention, a classification head, ...), and silently dropping weights would give wrong outputs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import PRESETS, ModelConfig
from engine.progress import progress_bar
from engine.weights import GPT2Weights, LayerWeights

SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HUB_PATTERNS = ["config.json", "*.safetensors", INDEX_FILE, "vocab.json", "merges.txt"]
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
LOAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FLOAT_STORAGE = {"F16", "BF16", "F32", "F64"}  # safetensors dtype tags we accept as weights

# Non-parameter buffers some checkpoints store (causal mask, masked-fill value): recognized and skipped.
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_LAYER = re.compile(r"h\.(\d+)\.")
# Hub ids are "name" or "owner/name": letters, digits, '-', '_', '.', not starting with '.' or '-', no "..".
_HUB_ID = re.compile(r"(?!.*\.\.)\w[\w.-]*(/\w[\w.-]*)?")


# ---------------------------------------------------------------------------------------------------------
# Finding the checkpoint


def resolve_model(model: str | os.PathLike) -> Path:
    """The local directory holding ``model``: a directory as is, else a hub id downloaded (or found cached)."""
    if isinstance(model, os.PathLike) or not _HUB_ID.fullmatch(str(model)) or Path(model).exists():
        return _check_local_dir(Path(model).expanduser())
    repo_id = str(model)
    if repo_id in PRESETS:  # bare names of the published family live under openai-community
        repo_id = f"openai-community/{repo_id}"
    return _download(repo_id)


def _check_local_dir(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"model path {path} is not a directory (pass the directory holding config.json)")
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {path} has no config.json")
    return path


def _download(repo_id: str) -> Path:
    """Fetch config, safetensors and tokenizer files of ``repo_id``: from the local cache first, then online."""
    fix = (
        f"download it while online (e.g. `huggingface-cli download {repo_id}`), pass a local directory holding "
        "config.json and model.safetensors, or use load_format='dummy' for random weights"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(
            f"{repo_id!r} is not a local directory and huggingface_hub is not installed to fetch it: "
            f"`pip install huggingface_hub`, or pass a local directory, or use load_format='dummy'"
        ) from None
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
        if _has_weights(path):
            return path
    except Exception:  # not cached (LocalEntryNotFoundError and friends): try the network
        pass
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, no such repo, HTTP errors: all end the same way for the user
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        cause = f"{type(e).__name__}: {first_line}" if first_line else type(e).__name__
        raise ValueError(f"could not fetch model {repo_id!r} from the Hugging Face hub ({cause}); {fix}") from e
    if not _has_weights(path):
        raise ValueError(f"hub repository {repo_id!r} has no config.json + safetensors weights; {fix}")
    return path


def _has_weights(path: Path) -> bool:
    return (path / "config.json").is_file() and ((path / SAFETENSORS_FILE).is_file() or (path / INDEX_FILE).is_file())


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of the checkpoint: one file, or the shards its index names."""
    if (path / SAFETENSORS_FILE).is_file():
        return [path / SAFETENSORS_FILE]
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index (need a JSON object with 'weight_map'): {e}") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> shard file")
        shards = []
        for shard in dict.fromkeys(weight_map.values()):
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise ValueError(f"{index}: shard {shard!r} is not a file name in {path}")
            if not (path / shard).is_file():
                raise ValueError(f"{index}: names shard {shard} which is missing from {path}")
            shards.append(path / shard)
        return shards
    pickles = [name for name in PICKLE_FILES if (path / name).exists()]
    if pickles:
        raise ValueError(
            f"{path} holds only {pickles[0]}: PyTorch .bin/.pt files are pickles, which can run arbitrary code, "
            f"and are refused. Convert the checkpoint to safetensors (e.g. load it with transformers and "
            f"save_pretrained(dir, safe_serialization=True)) and pass that directory"
        )
    raise ValueError(f"{path} has no {SAFETENSORS_FILE} (and no {INDEX_FILE})")


# ---------------------------------------------------------------------------------------------------------
# What a checkpoint must hold

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass(frozen=True)
class _Spec:
    """One expected tensor: its checkpoint name, stored shape (as config field names) and where it goes."""

    name: str  # without the "transformer." prefix
    dims: tuple[str, ...]  # stored shape, each dim named by the config expression it must equal
    target: str  # "wte" or "layers.{i}.{field}"
    transpose: bool = False  # Conv1D [in, out] -> [out, in]


def _expected(config: ModelConfig) -> list[_Spec]:
    """The explicit list of tensors a GPT-2 checkpoint with ``config`` holds (shapes as stored by HF)."""
    specs = [
        _Spec("wte.weight", ("vocab_size", "n_embd"), "wte"),
        _Spec("wpe.weight", ("n_positions", "n_embd"), "wpe"),
    ]
    block = [  # (name, stored dims, LayerWeights field)
        ("ln_1.weight", ("n_embd",), "ln_1_weight"),
        ("ln_1.bias", ("n_embd",), "ln_1_bias"),
        ("attn.c_attn.weight", ("n_embd", "3*n_embd"), "attn_weight"),
        ("attn.c_attn.bias", ("3*n_embd",), "attn_bias"),
        ("attn.c_proj.weight", ("n_embd", "n_embd"), "attn_proj_weight"),
        ("attn.c_proj.bias", ("n_embd",), "attn_proj_bias"),
        ("ln_2.weight", ("n_embd",), "ln_2_weight"),
        ("ln_2.bias", ("n_embd",), "ln_2_bias"),
        ("mlp.c_fc.weight", ("n_embd", "n_inner"), "fc_weight"),
        ("mlp.c_fc.bias", ("n_inner",), "fc_bias"),
        ("mlp.c_proj.weight", ("n_inner", "n_embd"), "mlp_proj_weight"),
        ("mlp.c_proj.bias", ("n_embd",), "mlp_proj_bias"),
    ]
    for i in range(config.n_layer):
        for name, dims, field in block:
            specs.append(_Spec(f"h.{i}.{name}", dims, f"layers.{i}.{field}", transpose=name in _CONV1D))
    specs += [
        _Spec("ln_f.weight", ("n_embd",), "ln_f_weight"),
        _Spec("ln_f.bias", ("n_embd",), "ln_f_bias"),
    ]
    if not config.tie_word_embeddings:
        specs.append(_Spec("lm_head.weight", ("vocab_size", "n_embd"), "lm_head"))
    return specs


def _dim_value(config: ModelConfig, dim: str) -> int:
    return {
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_embd": config.n_embd,
        "3*n_embd": 3 * config.n_embd,
        "n_inner": config.d_ff,
    }[dim]


def _dim_label(config: ModelConfig, dim: str) -> str:
    if dim == "n_inner" and config.n_inner is None:
        return f"4*n_embd={config.d_ff}"
    return f"{dim}={_dim_value(config, dim)}"


def _check_shape(config: ModelConfig, spec: _Spec, key: str, shape: list[int], file: Path) -> None:
    want = [_dim_value(config, d) for d in spec.dims]
    if list(shape) == want:
        return
    detail = ""
    if len(shape) == len(want):
        bad = [
            f"dim {k} is {s} but config.json has {_dim_label(config, d)}"
            for k, (s, d) in enumerate(zip(shape, spec.dims, strict=True))
            if s != _dim_value(config, d)
        ]
        detail = "; " + ", ".join(bad)
    raise ValueError(
        f"{file}: tensor {key} has shape {list(shape)}, expected {want} "
        f"[{', '.join(_dim_label(config, d) for d in spec.dims)}]{detail}"
    )


def _names(items: Iterable[str], limit: int = 6) -> str:
    items = sorted(items, key=_natural)
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(
    path: str | os.PathLike,
    dtype: torch.dtype,
    device: torch.device | str,
    progress: bool = True,
) -> tuple[ModelConfig, GPT2Weights]:
    """Read ``config.json`` and the safetensors weights in ``path``, cast once to ``dtype`` on ``device``.

    Raises one ``ValueError`` naming the file or tensor for anything wrong with the checkpoint.
    """
    if dtype not in LOAD_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, LOAD_DTYPES))}, got {dtype}")
    path = _check_local_dir(Path(path))
    config = ModelConfig.from_file(path / "config.json")
    device = torch.device(device)
    with ExitStack() as stack:
        where = _open_all(_weight_files(path), stack)  # name (prefix stripped) -> (key, handle, file)
        specs = _validate(config, path, where)
        if config.tie_word_embeddings and "lm_head.weight" in where:
            key, handle, file = where["lm_head.weight"]
            wte_key, wte_handle, wte_file = where["wte.weight"]
            if not torch.equal(_read(handle, key, file), _read(wte_handle, wte_key, wte_file)):
                raise ValueError(
                    f"{file}: tensor {key} differs from {wte_key} but config.json has tie_word_embeddings=true; "
                    f"set it to false if the LM head really is untied"
                )
        values: dict[str, torch.Tensor] = {}
        for spec in progress_bar(specs, desc=f"loading {path.name}", unit="tensor", disable=not progress):
            key, handle, file = where[spec.name]
            tensor = _read(handle, key, file)
            tensor = tensor.to(device=device, dtype=dtype)
            if spec.transpose:
                tensor = tensor.t()
            values[spec.target] = tensor.contiguous()
            if not torch.isfinite(values[spec.target]).all():
                raise ValueError(f"{file}: tensor {key} has non-finite values (after casting to {dtype})")
    return config, _assemble(config, values)


def _open_all(files: list[Path], stack: ExitStack) -> dict[str, tuple[str, object, Path]]:
    """Open each safetensors file (memory-mapped) and map every tensor name, prefix stripped, to its file."""
    from safetensors import SafetensorError, safe_open

    where: dict[str, tuple[str, object, Path]] = {}
    for file in files:
        try:
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            keys = list(handle.keys())
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None
        for key in keys:
            name = key.removeprefix("transformer.")
            if name in where:
                raise ValueError(f"{file}: tensor {key} is also stored as {where[name][0]} in {where[name][2]}")
            where[name] = (key, handle, file)
    _check_index(files, where)
    return where


def _check_index(files: list[Path], where: dict[str, tuple[str, object, Path]]) -> None:
    """For a sharded checkpoint, every tensor the index lists must be in the shard it names."""
    index = files[0].parent / INDEX_FILE
    if files[0].name == SAFETENSORS_FILE or not index.is_file():
        return
    for key, shard in json.loads(index.read_text())["weight_map"].items():
        found = where.get(key.removeprefix("transformer."))
        if found is None or found[2].name != shard:
            actual = f"{shard} does not hold it" if found is None else f"it is in {found[2].name}"
            raise ValueError(f"{index}: lists tensor {key} in {shard}, but {actual}")


def _validate(config: ModelConfig, path: Path, where: dict[str, tuple[str, object, Path]]) -> list[_Spec]:
    """Check names, shapes and storage dtypes of everything before reading any data; return what to load."""
    specs = _expected(config)
    wanted = {s.name for s in specs}
    present = {n for n in where if not _BUFFER.fullmatch(n)}
    if config.tie_word_embeddings and "lm_head.weight" in present:
        wanted_or_tied = wanted | {"lm_head.weight"}
        specs_extra = [_Spec("lm_head.weight", ("vocab_size", "n_embd"), "lm_head")]  # checked, then compared
    else:
        wanted_or_tied, specs_extra = wanted, []
    deep = sorted({int(m.group(1)) for n in present if (m := _LAYER.match(n))} - set(range(config.n_layer)))
    if deep:
        raise ValueError(
            f"{path}: checkpoint has weights for layer(s) {_names(map(str, deep))} but config.json has "
            f"n_layer={config.n_layer}"
        )
    missing = wanted - present
    if missing:
        hint = " (config.json has tie_word_embeddings=false)" if "lm_head.weight" in missing else ""
        stored = 1 + max((int(m.group(1)) for n in present if (m := _LAYER.match(n))), default=-1)
        if any((m := _LAYER.match(n)) and int(m.group(1)) >= stored for n in missing):
            hint = f" (the checkpoint has {stored} layers but config.json has n_layer={config.n_layer})"
        raise ValueError(f"{path}: missing tensor(s) {_names(missing)}{hint}")
    unknown = present - wanted_or_tied
    if unknown:
        raise ValueError(
            f"{path}: unexpected tensor(s) {_names(where[n][0] for n in unknown)}: not part of a GPT-2 LM "
            f"(an unsupported variant or head?); refusing rather than ignoring weights"
        )
    for spec in specs + specs_extra:
        key, handle, file = where[spec.name]
        view = handle.get_slice(key)
        _check_shape(config, spec, key, view.get_shape(), file)
        if view.get_dtype() not in FLOAT_STORAGE:
            raise ValueError(f"{file}: tensor {key} is stored as {view.get_dtype()}, expected a float type")
    return specs


def _read(handle: object, key: str, file: Path) -> torch.Tensor:
    from safetensors import SafetensorError

    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: could not read tensor {key} (truncated or corrupt?): {e}") from None


def _assemble(config: ModelConfig, values: dict[str, torch.Tensor]) -> GPT2Weights:
    layers = []
    for i in range(config.n_layer):
        prefix = f"layers.{i}."
        layers.append(LayerWeights(**{k.removeprefix(prefix): v for k, v in values.items() if k.startswith(prefix)}))
    return GPT2Weights(
        wte=values["wte"],
        wpe=values["wpe"],
        layers=layers,
        ln_f_weight=values["ln_f_weight"],
        ln_f_bias=values["ln_f_bias"],
        lm_head=values.get("lm_head"),
    )
