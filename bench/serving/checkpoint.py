"""The one checkpoint every launched server loads: a directory, or a preset with random weights written once."""

from __future__ import annotations

import json
from pathlib import Path

from . import log

TOKENIZER_FILES = ("vocab.json", "merges.txt")


def write_random_checkpoint(preset: str, seed: int, directory: Path) -> Path:
    """transformers' GPT-2 ``preset`` randomly initialised, ``save_pretrained`` to ``directory`` with GPT-2's
    ``vocab.json`` + ``merges.txt`` (all that ``transformers serve`` and ours need to load it offline)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine import tokenizer as tk
    from engine.config import PRESETS

    if preset not in PRESETS:
        raise SystemExit(f"--checkpoint {preset!r}: neither a directory nor a preset ({', '.join(PRESETS)})")
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(**PRESETS[preset])).save_pretrained(directory)
    ranks_file = tk.find_whisper_gpt2_ranks()
    if ranks_file is not None:
        ranks = tk.read_tiktoken_file(ranks_file)
    else:
        ranks = tk.load_tokenizer(None).encoding._mergeable_ranks  # tiktoken's cached gpt2 encoding
    tk.write_hf_files(ranks, directory)
    return directory


def prepare_checkpoint(name: str, directory: str | None, seed: int, tmp: Path) -> Path:
    """``name`` itself when it is a directory (warning when transformers serve could not tokenize for it), else the
    preset ``name`` with random weights written to ``directory`` (default: under ``tmp``)."""
    path = Path(name)
    if path.is_dir():
        missing = [f for f in ("config.json", *TOKENIZER_FILES) if not (path / f).is_file()]
        if missing:
            log(f"WARNING: {path} has no {', '.join(missing)}: transformers serve needs them to load it")
        return path.resolve()
    target = Path(directory).resolve() if directory else tmp / f"{name}-random"
    log(f"writing {name} with random weights (seed {seed}) and GPT-2's tokenizer files to {target}")
    return write_random_checkpoint(name, seed, target)


def context_len(checkpoint: Path) -> int:
    """The checkpoint's positions (n_positions), 1024 when its config does not say."""
    config = json.loads((checkpoint / "config.json").read_text())
    return int(config.get("n_positions", config.get("max_position_embeddings", 1024)))
