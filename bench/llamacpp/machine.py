"""What a result was measured on and with: CPU, its vector features, load, versions, date, commit."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

from . import ROOT

CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


def cpu() -> tuple[str, list[str]]:
    """The CPU's model name and which of ``CPU_FEATURES`` it has (from /proc/cpuinfo)."""
    name, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return name, [f for f in CPU_FEATURES if f in flags]


def git_commit() -> str:
    """HEAD, with ``-dirty`` when tracked files differ from it."""

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except OSError:
        return ""


def machine_info() -> dict:
    name, features = cpu()
    versions = {}
    for package in ("torch", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return dict(
        cpu=name,
        cpu_features=features,
        cores=os.cpu_count(),
        load_average=os.getloadavg(),
        python=platform.python_version(),
        versions=versions,
        date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        git_commit=git_commit(),
    )


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
