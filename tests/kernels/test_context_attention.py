"""Attention of query chunks over the paged KV cache (chunked prefill, prefix-cache hits), against a float64
gather-then-softmax reference.

Every batch is built from (context, chunk length) pairs: the sequence has ``context`` tokens cached before this
step's ``L`` queries, and all ``context + L`` tokens sit in the cache. Blocks are handed out in shuffled order,
each table row is padded with blocks nobody owns, and every cache slot no token owns is NaN, so reading past a
sequence's end (or a stale table entry) fails the test; outputs are NaN until the kernel writes them.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from kernels import context_attention as ctx_attn
from kernels.attention import prefill_attention_ref
from kernels.context_attention import context_attention, context_attention_ref, fits, get_configs
from kernels.kv_cache import store_kv_ref
from kernels.paged_attention import decode_attention_ref
from kernels.utils import FLOAT_DTYPES
from tests.helpers import DEVICE, rel_err, tuning_every_config

DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)]


def paged_batch(chunks: list[tuple[int, int]], H: int, hd: int, block_size: int, dtype: torch.dtype):
    """Queries and a NaN-poisoned paged cache for ``chunks`` = [(context, L)] per sequence.

    Returns ``q`` (a strided ``[T, H, hd]`` view of a fused ``[T, 3, H, hd]`` projection), ``k_cache``,
    ``v_cache``, ``cu_seqlens_q``, ``seq_lens`` and ``block_tables`` (shuffled blocks, two padding columns).
    """
    B = len(chunks)
    lens = [c + n for c, n in chunks]
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 3
    k_cache = torch.full((num_blocks, block_size, H, hd), float("nan"), device=DEVICE, dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    ids = torch.randperm(num_blocks, device=DEVICE)
    spare = ids[sum(needed) :]  # blocks nobody owns: they stay NaN
    tables = spare[torch.randint(0, len(spare), (B, max(needed) + 2), device=DEVICE)].to(torch.int32)
    used = 0
    for b, n in enumerate(lens):
        own = ids[used : used + needed[b]]
        used += needed[b]
        tables[b, : len(own)] = own.to(torch.int32)
        pos = torch.arange(n, device=DEVICE)
        slots = own[pos // block_size] * block_size + pos % block_size
        k_cache.view(-1, H, hd)[slots] = torch.randn(n, H, hd, device=DEVICE).to(dtype)
        v_cache.view(-1, H, hd)[slots] = torch.randn(n, H, hd, device=DEVICE).to(dtype)
    q_lens = [n for _, n in chunks]
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(q_lens), 3, H, hd, device=DEVICE).to(dtype)[:, 0]
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, cu, seq_lens, tables


def mixed_chunks(block_size: int, max_context: int, max_len: int) -> list[tuple[int, int]]:
    """A ragged batch of every kind of chunk, in random order: decode-like (L = 1 after a context), mid-prompt
    (L > 1 after a context that ends inside a block), a whole prompt (no context), an empty chunk, and one chunk
    of exactly ``max_len`` after ``max_context`` tokens. Lengths are fresh random draws."""
    rand = random.randint
    mid_context = random.choice([c for c in range(1, max_context + 1) if block_size == 1 or c % block_size])
    chunks = [
        (rand(1, max_context), 1),
        (rand(1, max_context), 1),
        (mid_context, rand(2, max_len)),
        (0, rand(2, max_len)),
        (rand(0, max_context), 0),
        (max_context, max_len),
    ]
    random.shuffle(chunks)
    return chunks


def run_poisoned(q, k_cache, v_cache, cu, seq_lens, tables, scale, max_q=None, max_k=None):
    """The kernel into a NaN-filled ``out``; returns it after checking it is the result and fully written."""
    max_q = max(torch.diff(cu).tolist()) if max_q is None else max_q
    max_k = max(seq_lens.tolist()) if max_k is None else max_k
    out = torch.full(q.shape, float("nan"), device=DEVICE, dtype=q.dtype)
    result = context_attention(q, k_cache, v_cache, cu, seq_lens, tables, max_q, max_k, scale, out=out)
    assert result is out
    assert not out.isnan().any(), "unwritten output rows, or NaN cache slots past a sequence were read"
    return out


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("block_size", [16, 4])
def test_mixed_chunks_match_reference(block_size, dtype, tol):
    """Decode-like, mid-prompt, whole-prompt and empty chunks in one batch; contexts and chunks cross blocks."""
    H, hd = 2, 64
    chunks = mixed_chunks(block_size, max_context=45, max_len=40)
    q, k_cache, v_cache, cu, seq_lens, tables = paged_batch(chunks, H, hd, block_size, dtype)
    scale = 1.0 / math.sqrt(hd)

    out = run_poisoned(q, k_cache, v_cache, cu, seq_lens, tables, scale)

    assert rel_err(out, context_attention_ref(q, k_cache, v_cache, cu, seq_lens, tables, scale)) < tol


@pytest.mark.parametrize("block_size", [1, 32])
def test_other_block_sizes(block_size):
    """One token per block (a table entry per key) and blocks wider than a key step."""
    chunks = mixed_chunks(block_size, max_context=40, max_len=20)
    q, k_cache, v_cache, cu, seq_lens, tables = paged_batch(chunks, 2, 64, block_size, torch.float16)
    out = run_poisoned(q, k_cache, v_cache, cu, seq_lens, tables, 0.125)
    assert rel_err(out, context_attention_ref(q, k_cache, v_cache, cu, seq_lens, tables, 0.125)) < 2e-3


@pytest.mark.parametrize("hd", [16, 32, 128])
def test_other_head_dims(hd):
    chunks = mixed_chunks(16, max_context=30, max_len=20)
    q, k_cache, v_cache, cu, seq_lens, tables = paged_batch(chunks, 2, hd, 16, torch.float16)
    out = run_poisoned(q, k_cache, v_cache, cu, seq_lens, tables, 0.3)
    assert rel_err(out, context_attention_ref(q, k_cache, v_cache, cu, seq_lens, tables, 0.3)) < 2e-3


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_whole_prompts_match_prefill_attention(dtype, tol):
    """With no cached context, attention over the cache is prefill attention: the same K/V stored in the cache
    through the block tables (as the engine's store does) give prefill_attention_ref's result."""
    H, hd, block_size = 2, 64, 16
    lens = [random.randint(1, 40), random.randint(1, 16), random.randint(17, 40)]  # one crosses a block
    q, k_cache, v_cache, cu, seq_lens, tables = paged_batch([(0, n) for n in lens], H, hd, block_size, dtype)
    k = torch.randn(q.shape, device=DEVICE).to(dtype)
    v = torch.randn(q.shape, device=DEVICE).to(dtype)
    pos = [torch.arange(n, device=DEVICE) for n in lens]
    slots = torch.cat([tables[b, p // block_size].long() * block_size + p % block_size for b, p in enumerate(pos)])
    store_kv_ref(k, v, k_cache, v_cache, slots)
    ref = prefill_attention_ref(q, k, v, cu, 0.125)
    assert rel_err(context_attention_ref(q, k_cache, v_cache, cu, seq_lens, tables, 0.125), ref) < 1e-12

    out = run_poisoned(q, k_cache, v_cache, cu, seq_lens, tables, 0.125)

    assert rel_err(out, ref) < tol


def test_single_token_chunks_match_decode_attention():
    """Chunks of one query after their whole context are paged decode: decode_attention_ref agrees."""
    chunks = [(random.randint(0, 60), 1) for _ in range(4)]
    q, k_cache, v_cache, cu, seq_lens, tables = paged_batch(chunks, 2, 64, 16, torch.float32)
    ref = decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, 0.125)
    assert rel_err(context_attention_ref(q, k_cache, v_cache, cu, seq_lens, tables, 0.125), ref) < 1e-12
    out = run_poisoned(q, k_cache, v_cache, cu, seq_lens, tables, 0.125)
    assert rel_err(out, ref) < 1e-5


def test_empty_chunks_write_nothing():
    """Sequences with no query rows write nothing, and rows past the last chunk (padding) keep their contents;
    a batch of only empty chunks launches nothing."""
    chunks = [(random.randint(1, 40), 0), (10, 7), (0, 0), (random.randint(0, 40), 3)]
    q, k_cache, v_cache, cu, seq_lens, tables = paged_batch(chunks, 2, 64, 16, torch.float16)
    q = torch.cat([q, torch.randn(2, 2, 64, device=DEVICE).to(q.dtype)])  # two padding rows no chunk owns
    out = torch.full(q.shape, float("nan"), device=DEVICE, dtype=q.dtype)
    out[10:] = 7.0
    context_attention(q, k_cache, v_cache, cu, seq_lens, tables, 7, 50, 0.125, out=out)
    assert not out[:10].isnan().any()
    assert torch.equal(out[10:], torch.full_like(out[10:], 7.0))
    ref = context_attention_ref(q[:10], k_cache, v_cache, cu, seq_lens, tables, 0.125)
    assert rel_err(out[:10], ref) < 2e-3

    empty = [(5, 0), (0, 0)]
    q, k_cache, v_cache, cu, seq_lens, tables = paged_batch(empty, 2, 64, 16, torch.float16)
    q = torch.randn(3, 2, 64, device=DEVICE, dtype=torch.float16)
    out = torch.full(q.shape, 7.0, device=DEVICE, dtype=q.dtype)
    context_attention(q, k_cache, v_cache, cu, seq_lens, tables, 3, 5, 0.125, out=out)
    assert torch.equal(out, torch.full_like(out, 7.0))


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_every_tuned_config_matches_reference(monkeypatch, dtype, tol):
    """Each tile the autotuner may pick on a GPU (the interpreter otherwise runs only the first), run through
    Triton's tuning path: right for every one. A chunk longer than the tallest BLOCK_M after a long context takes
    the unmasked loop and a diagonal that starts mid-step; the batch also holds decode-like and empty chunks."""
    H, hd, block_size = 1, 64, 16
    max_len = random.randint(65, 90)  # next power of two 128: no tile is pruned for its height
    chunks = [(random.randint(65, 100), max_len), (random.randint(1, 50), 1), (0, random.randint(2, 30)), (9, 0)]
    random.shuffle(chunks)
    q, k_cache, v_cache, cu, seq_lens, tables = paged_batch(chunks, H, hd, block_size, dtype)
    max_k = max(seq_lens.tolist())
    ref = context_attention_ref(q, k_cache, v_cache, cu, seq_lens, tables, 0.125)
    out = torch.empty(q.shape, device=DEVICE, dtype=dtype)

    def check(run):
        out.fill_(float("nan"))
        run()
        assert not out.isnan().any(), f"config #{len(timed)}"
        assert rel_err(out, ref) < tol, f"config #{len(timed)}"

    configs = get_configs()
    tuned, timed = tuning_every_config(ctx_attn._context_attention_kernel, configs, check)
    monkeypatch.setattr(ctx_attn, "_context_attention_kernel", tuned)
    context_attention(q, k_cache, v_cache, cu, seq_lens, tables, max_len, max_k, 0.125, out=out)
    assert rel_err(out, ref) < tol
    assert len(timed) == sum(fits(c, hd, dtype == torch.float32) for c in configs) > 1


def test_prune_drops_tiles_taller_than_the_chunks():
    """Tiles taller than the longest chunk (its next power of two, at least 16) only compute padding rows: the
    autotuner's prune drops them, along with the tiles that spill for the dtype."""
    configs = get_configs()
    for dtype in FLOAT_DTYPES:
        q = torch.empty(0, 1, 64, device=DEVICE, dtype=dtype)
        for bucket, tallest in ((1, 16), (16, 16), (32, 32), (256, 128)):
            kept = ctx_attn._prune(configs, {"Q": q, "seqlen_bucket": bucket}, HEAD_DIM=64)
            assert kept == [
                c for c in configs if fits(c, 64, dtype == torch.float32) and c.kwargs["BLOCK_M"] <= tallest
            ]
            assert kept[0] is configs[0]


def test_launches_in_chunks_past_the_grid_limit(monkeypatch):
    """(sequence, head) pairs past CUDA's 65535 grid rows launch in chunks of sequences: here 3 heads and a
    limit of 7 give chunks of 2 sequences out of 5, the last one alone; each reads its slice of the tables."""
    monkeypatch.setattr(ctx_attn, "MAX_GRID_Y", 7)
    chunks = [(random.randint(0, 30), random.randint(0, 12)) for _ in range(5)]
    chunks[random.randrange(5)] = (random.randint(0, 30), 12)
    q, k_cache, v_cache, cu, seq_lens, tables = paged_batch(chunks, 3, 64, 16, torch.float16)
    out = run_poisoned(q, k_cache, v_cache, cu, seq_lens, tables, 0.125)
    assert rel_err(out, context_attention_ref(q, k_cache, v_cache, cu, seq_lens, tables, 0.125)) < 2e-3


def test_bad_inputs_raise():
    q, k_cache, v_cache, cu, lens, tables = paged_batch([(5, 3), (0, 4)], 2, 64, 16, torch.float16)

    def call(**changes):
        args = dict(q=q, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=cu, seq_lens=lens, block_tables=tables,
                    max_seqlen_q=4, max_seqlen_k=8, scale=0.125) | changes  # fmt: skip
        return context_attention(**args)

    with pytest.raises(ValueError, match="q has dtype"):
        call(q=q.to(torch.float64))
    with pytest.raises(ValueError, match="v_cache has dtype"):
        call(v_cache=v_cache.float())
    with pytest.raises(ValueError, match="k_cache"):
        call(k_cache=k_cache[:, :, :1].contiguous())
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        call(k_cache=k_cache.transpose(0, 1))
    with pytest.raises(ValueError, match="cu_seqlens_q has dtype"):
        call(cu_seqlens_q=cu.long())
    with pytest.raises(ValueError, match="seq_lens has dtype"):
        call(seq_lens=lens.long())
    with pytest.raises(ValueError, match="block_tables has dtype"):
        call(block_tables=tables.long())
    with pytest.raises(ValueError, match="seq_lens .* need B=2 rows"):
        call(seq_lens=lens[:1])
    with pytest.raises(ValueError, match="block_tables .* need B=2 rows"):
        call(block_tables=tables[:1])
    with pytest.raises(ValueError, match="block_tables needs a contiguous last dim"):
        call(block_tables=tables.t().contiguous().t())
    with pytest.raises(ValueError, match="cu_seqlens_q must hold"):
        call(cu_seqlens_q=cu[:0], seq_lens=lens[:0], block_tables=tables[:0])
    with pytest.raises(ValueError, match="head dim"):
        q48 = torch.zeros(7, 2, 48, device=DEVICE, dtype=torch.float16)
        c48 = torch.zeros(4, 16, 2, 48, device=DEVICE, dtype=torch.float16)
        call(q=q48, k_cache=c48, v_cache=c48.clone())
    with pytest.raises(ValueError, match="q needs a contiguous last dim"):
        call(q=q.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="max_seqlen_q"):
        call(max_seqlen_q=8)  # more than T = 7
    with pytest.raises(ValueError, match="max_seqlen_q"):
        call(max_seqlen_q=4.0)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        call(max_seqlen_k=tables.shape[1] * 16 + 1)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        call(max_seqlen_k=-1)
    with pytest.raises(ValueError, match="out has shape"):
        call(out=torch.empty(7, 2, 32, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be contiguous"):
        call(out=torch.empty(7, 3, 2, 64, device=DEVICE, dtype=torch.float16)[:, 0])
    with pytest.raises(ValueError, match="out has dtype"):
        call(out=torch.empty(7, 2, 64, device=DEVICE, dtype=torch.float32))
    with pytest.raises(ValueError, match="one device"):
        call(seq_lens=lens.to("meta"))
