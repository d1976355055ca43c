"""The random-weights checkpoint, and its GGUF files made by llama.cpp's own ``convert_hf_to_gguf.py``.

Everything lands in a work directory (``<cache>/models/<preset>-seed<seed>/``): ``hf/`` (``save_pretrained`` plus
GPT-2's ``vocab.json`` / ``merges.txt``), ``convert-src/`` (the same files with a patched ``config.json``) and one
``<outtype>.gguf`` per type. Files already there are reused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from . import LlamaCppError, log
from .build import LlamaCpp, tail

OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py writes directly


def with_n_ctx(config: dict) -> dict:
    """``config`` with ``n_ctx`` (the converter's context length for GPT-2), which transformers 5 no longer writes:
    ``n_positions``, as older transformers wrote it."""
    if "n_ctx" in config:
        return dict(config)
    if "n_positions" not in config:
        raise LlamaCppError("config.json has neither n_ctx nor n_positions: not a GPT-2 config?")
    return {**config, "n_ctx": config["n_positions"]}


def checkpoint(work: Path, preset: str, seed: int) -> Path:
    """``work/hf``: transformers' GPT-2 ``preset`` with random weights (seed ``seed``) and GPT-2's tokenizer files."""
    from bench.serving.checkpoint import write_random_checkpoint

    target = work / "hf"
    if (target / "model.safetensors").is_file() and (target / "merges.txt").is_file():
        return target
    log(f"checkpoint: {preset} with random weights (seed {seed}) -> {target}")
    partial = work / "hf.partial"
    write_random_checkpoint(preset, seed, partial)
    partial.rename(target)
    return target


def conversion_source(hf: Path, target: Path) -> Path:
    """``target``: links to ``hf``'s files and a ``config.json`` the converter accepts (see :func:`with_n_ctx`)."""
    target.mkdir(parents=True, exist_ok=True)
    for f in hf.iterdir():
        link = target / f.name
        if f.name != "config.json" and not link.exists():
            link.symlink_to(f.resolve())
    config = json.loads((hf / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(with_n_ctx(config), indent=2))
    return target


def to_gguf(llama: LlamaCpp, hf: Path, outtype: str, work: Path) -> Path:
    """``work/<outtype>.gguf`` converted from ``hf``, made once."""
    if outtype not in OUTTYPES:
        raise LlamaCppError(f"GGUF type {outtype!r}: convert_hf_to_gguf.py writes {', '.join(OUTTYPES)}")
    out = work / f"{outtype}.gguf"
    if out.is_file():
        return out
    source = conversion_source(hf, work / "convert-src")
    log(f"convert: {hf.name} -> {out.name} (convert_hf_to_gguf.py --outtype {outtype})")
    partial = out.with_suffix(".partial")
    cmd = [sys.executable, str(llama.converter), str(source), "--outtype", outtype, "--outfile", str(partial)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not partial.is_file():
        raise LlamaCppError(f"convert_hf_to_gguf.py --outtype {outtype} failed:\n{tail(done.stdout + done.stderr)}")
    partial.rename(out)
    return out
