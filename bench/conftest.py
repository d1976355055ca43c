"""pytest-benchmark suites of what this CPU measures honestly: the host side of a step (``bench/host/``).

    pytest bench --benchmark-only                 # time them (pyproject's addopts disable benchmarks for the suite)
    pytest bench --benchmark-disable              # run each once, as a check (tests/bench does this in CI)

``--benchmark-only`` turns the timings back on: pyproject.toml's ``--benchmark-disable`` (which keeps ``pytest -q``
from timing anything) and ``--benchmark-only`` would otherwise refuse each other.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's engine/, not an installed copy


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's own (trylast) pytest_configure reads the options
def pytest_configure(config):
    if config.getoption("benchmark_only", False) and config.getoption("benchmark_disable", False):
        config.option.benchmark_enable = True


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread: the host dispatches a step's ops from one thread, and on a shared 2-core machine a
    second OpenMP thread spinning at every op's barrier measures the neighbours, not us."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """GPT-2's vocab.json + merges.txt, rebuilt from openai-whisper's copy of tiktoken's ranks (as the tests do)."""
    from engine.tokenizer import find_whisper_gpt2_ranks, read_tiktoken_file, write_hf_files

    path = find_whisper_gpt2_ranks()
    if path is None:
        pytest.fail("openai-whisper is not installed: run `pip install --no-deps openai-whisper` (see README)")
    d = tmp_path_factory.mktemp("gpt2-tokenizer")
    write_hf_files(read_tiktoken_file(path), d)
    return d


@pytest.fixture(scope="session")
def text() -> str:
    """Real prose and code to tokenize: this project's README and CONTRIBUTING (about 30 KB)."""
    return (ROOT / "README.md").read_text() + (ROOT / "CONTRIBUTING.md").read_text()
