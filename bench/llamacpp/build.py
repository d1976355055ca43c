"""llama.cpp's benchmark tools built from the ``llama-cpp-python`` source package, once per version.

The sdist (``pip download --no-binary :all:``) carries the llama.cpp tree it binds (``vendor/llama.cpp``); we build
only the four tools the comparison runs, CPU only, with ``-DGGML_NATIVE=ON`` (this machine's AVX-512 / VNNI / BF16
paths), into ``~/.cache/gpt2-triton/llama.cpp/<version>/``. A finished build is found there and reused.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from . import CACHE, LlamaCppError, log

LLAMA_CPP_PYTHON = "0.3.36"  # the pinned sdist: the same llama.cpp from every clean clone
TOOLS = ("llama-bench", "llama-batched-bench", "llama-simple", "llama-tokenize")
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # the build machine's instruction set: the fair peer on this CPU
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_EXAMPLES=ON",  # llama-simple
)


@dataclass(frozen=True)
class LlamaCpp:
    """A built llama.cpp: where its tools and its source tree (``convert_hf_to_gguf.py``) are."""

    version: str  # llama-cpp-python's version
    source: Path  # vendor/llama.cpp
    bin: Path

    def tool(self, name: str) -> Path:
        return self.bin / name

    @property
    def converter(self) -> Path:
        return self.source / "convert_hf_to_gguf.py"

    def commit(self) -> str:
        """The llama.cpp commit the sdist vendors ('' when its build info does not say)."""
        info = self.bin.parent / "common" / "build-info.cpp"
        match = re.search(r'LLAMA_COMMIT\s*=\s*"([^"]*)"', info.read_text()) if info.is_file() else None
        return match.group(1) if match else ""


def cache_dir(version: str, root: Path = CACHE) -> Path:
    return root / version


def cached(version: str, root: Path = CACHE) -> LlamaCpp:
    """The build of ``version`` under ``root`` (its tools may be missing: see :func:`is_built`)."""
    base = cache_dir(version, root)
    return LlamaCpp(version, base / "sdist" / "vendor" / "llama.cpp", base / "build" / "bin")


def is_built(llama: LlamaCpp) -> bool:
    return llama.converter.is_file() and all(llama.tool(t).is_file() for t in TOOLS)


def ensure_built(
    version: str = LLAMA_CPP_PYTHON, jobs: int = 2, skip_build: bool = False, root: Path = CACHE
) -> LlamaCpp:
    """The cached build of ``version``, building it first unless it is there (``skip_build``: it must be)."""
    llama = cached(version, root)
    if is_built(llama):
        log(f"llama.cpp: using the cached build in {cache_dir(version, root)}")
        return llama
    if skip_build:
        raise LlamaCppError(
            f"--skip-build: no finished llama.cpp build in {cache_dir(version, root)}; run once without it"
        )
    base = cache_dir(version, root)
    base.mkdir(parents=True, exist_ok=True)
    if not llama.source.is_dir():
        extract(download_sdist(version, base), base / "sdist")
    cmake = find_cmake()
    build = base / "build"
    log(
        f"llama.cpp: building {', '.join(TOOLS)} with {jobs} jobs (CPU only, native); a few minutes, "
        f"log in {base / 'build.log'}"
    )
    with open(base / "build.log", "w") as out:
        run_logged([cmake, "-S", str(llama.source), "-B", str(build), *CMAKE_OPTIONS], out, "cmake configure")
        run_logged([cmake, "--build", str(build), "-j", str(jobs), "--target", *TOOLS], out, "cmake build")
    if not is_built(llama):
        raise LlamaCppError(f"llama.cpp: the build finished without {', '.join(TOOLS)} in {llama.bin}")
    log(f"llama.cpp: built in {build}")
    return llama


def download_sdist(version: str, directory: Path) -> Path:
    """``llama-cpp-python==version``'s source archive, downloaded with pip into ``directory``."""
    name = f"llama_cpp_python-{version}.tar.gz"
    if (directory / name).is_file():
        return directory / name
    log(f"llama.cpp: downloading the llama-cpp-python {version} source package (about 80 MB)")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"llama-cpp-python=={version}",
        "-d",
        str(directory),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (directory / name).is_file():
        raise LlamaCppError(f"pip download llama-cpp-python=={version} failed: {tail(done.stdout + done.stderr)}")
    return directory / name


def extract(archive: Path, target: Path) -> None:
    """Unpack the sdist's single top directory as ``target``."""
    log(f"llama.cpp: unpacking {archive.name}")
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(staging, filter="data")
    (top,) = staging.iterdir()
    if not (top / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        raise LlamaCppError(f"{archive.name} has no vendor/llama.cpp: not a llama-cpp-python source package?")
    top.rename(target)
    staging.rmdir()


def find_cmake() -> str:
    """cmake from PATH or beside this Python; ``pip install cmake`` when there is none."""
    for candidate in (shutil.which("cmake"), Path(sys.executable).parent / "cmake"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    log("llama.cpp: no cmake found; pip install cmake")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "cmake"], capture_output=True, text=True)
    local = Path(sys.executable).parent / "cmake"
    found = shutil.which("cmake") or (str(local) if local.is_file() else None)
    if done.returncode != 0 or found is None:
        raise LlamaCppError(f"no cmake, and pip install cmake failed: {tail(done.stdout + done.stderr)}")
    return found


def run_logged(cmd: list[str], out, what: str) -> None:
    """Run ``cmd`` with its output in the log file ``out``, printing the build's progress every 10%."""
    out.write(f"$ {' '.join(cmd)}\n")
    out.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    shown, lines = -10, []
    for line in proc.stdout:
        out.write(line)
        lines = (lines + [line])[-20:]
        match = re.match(r"\[\s*(\d+)%\]", line)
        if match and int(match.group(1)) >= shown + 10:
            shown = int(match.group(1))
            log(f"llama.cpp: {what} {shown}%")
    if proc.wait() != 0:
        raise LlamaCppError(
            f"llama.cpp: {what} failed (exit {proc.returncode}); last lines:\n{''.join(lines)}full log: {out.name}"
        )


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
