"""Shared fixtures: per-test fresh seeds, the Triton interpreter on CPU-only machines, tiny GPT-2 checkpoints.

The interpreter switch must happen before anything imports ``triton``: Triton reads ``TRITON_INTERPRET``
when a kernel is decorated, i.e. when ``kernels.*`` is imported. pytest loads this file before any test module,
so it is set here; helper functions live in :mod:`tests.helpers`, which test modules import.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import make_hf_model, save_checkpoint  # noqa: E402 (after the interpreter switch)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Seed torch and random with a fresh seed per test, printed so a failure can be replayed.

    Random draws belong inside tests (or fixtures), never in ``parametrize`` lists: test ids must be the same at
    every collection (pytest-xdist workers collect separately, ``--lf`` reruns by id).
    """
    seed = int(os.environ.get("TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"\n[seed] {request.node.nodeid}: TEST_SEED={seed}")
    torch.manual_seed(seed)
    random.seed(seed)
    return seed


@pytest.fixture(scope="session")
def gpt2_ranks_file():
    """tiktoken's GPT-2 BPE ranks, shipped by the openai-whisper sdist (read without importing whisper)."""
    from engine.tokenizer import find_whisper_gpt2_ranks

    path = find_whisper_gpt2_ranks()
    if path is None:
        pytest.fail("openai-whisper is not installed: run `pip install --no-deps openai-whisper` (see README)")
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory, gpt2_ranks_file):
    """A directory holding GPT-2's vocab.json and merges.txt, rebuilt from the rank file."""
    from engine.tokenizer import read_tiktoken_file, write_hf_files

    d = tmp_path_factory.mktemp("gpt2-tokenizer")
    write_hf_files(read_tiktoken_file(gpt2_ranks_file), d)
    return d


@pytest.fixture(scope="session")
def hf_model():
    """The transformers model behind ``tiny_checkpoint`` (float32, eval mode)."""
    torch.manual_seed(random.SystemRandom().randrange(2**31))
    return make_hf_model()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, hf_model, gpt2_tokenizer_dir):
    """A tiny random GPT-2 saved by ``save_pretrained`` (transformer. prefix, tied lm_head) plus tokenizer."""
    return save_checkpoint(hf_model, tmp_path_factory.mktemp("tiny-gpt2"), gpt2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_published_checkpoint(tmp_path_factory, hf_model, gpt2_tokenizer_dir):
    """The same weights in the openai-community layout (no prefix, buffers stored, no lm_head)."""
    return save_checkpoint(hf_model, tmp_path_factory.mktemp("tiny-gpt2-pub"), gpt2_tokenizer_dir, True)
