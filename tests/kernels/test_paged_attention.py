"""Paged decode attention (flash-decoding), against a float64 gather-then-softmax reference.

The cache is poisoned with NaN everywhere no context token lives (unused blocks, the tail of each last block,
table entries past the context), so reading anything outside a sequence's context fails the test.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.torch_ops import TorchOps
from kernels.paged_attention import CONFIGS, FP32_CONFIGS, DecodeConfig, decode_attention, decode_attention_ref
from tests.helpers import DEVICE, rel_err

DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)]


def paged_cache(context_lens: list[int], H: int, hd: int, block_size: int, dtype: torch.dtype, poison: bool = True):
    """A cache whose blocks are handed out to the sequences in shuffled order; every unused slot is NaN."""
    B = len(context_lens)
    blocks_needed = [max(1, -(-n // block_size)) for n in context_lens]
    width = max(blocks_needed) + 1  # one spare column: table entries past the context must never be read
    num_blocks = sum(blocks_needed) + 3
    fill = float("nan") if poison else 0.0
    k_cache = torch.full((num_blocks, block_size, H, hd), fill, device=DEVICE, dtype=dtype)
    v_cache = torch.full((num_blocks, block_size, H, hd), fill, device=DEVICE, dtype=dtype)
    ids = torch.randperm(num_blocks, device=DEVICE)
    spare = ids[sum(blocks_needed) :]  # blocks nobody owns: still NaN
    tables = spare[torch.randint(0, len(spare), (B, width), device=DEVICE)].to(torch.int32)
    used = 0
    for b, n in enumerate(context_lens):
        own = ids[used : used + blocks_needed[b]]
        used += blocks_needed[b]
        tables[b, : len(own)] = own.to(torch.int32)
        pos = torch.arange(n, device=DEVICE)
        slots = own[pos // block_size] * block_size + pos % block_size
        k_cache.view(-1, H, hd)[slots] = torch.randn(n, H, hd, device=DEVICE).to(dtype)
        v_cache.view(-1, H, hd)[slots] = torch.randn(n, H, hd, device=DEVICE).to(dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, tables, lens


def random_context_lens(B: int, max_len: int) -> list[int]:
    """Fresh random lengths: one of max_len, one of 1 (when B > 1), one odd, the rest anything in [1, max_len]."""
    lens = torch.randint(1, max_len + 1, (B,)).tolist()
    lens[0] = max_len
    if B > 1:
        lens[1] = 1
    if B > 2:
        lens[2] = min(max_len, 2 * torch.randint(0, (max_len + 1) // 2, ()).item() + 1)
    return lens


def fused_q(B: int, H: int, hd: int, dtype: torch.dtype) -> torch.Tensor:
    """q as a strided [B, H, hd] view of the fused QKV projection [B, 3 * H * hd]."""
    return torch.randn(B, 3 * H * hd, device=DEVICE).to(dtype).view(B, 3, H, hd)[:, 0]


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(
    "B, max_len, partition_size",
    [
        (1, 1, None),  # a single token: one partition, no reduction
        (4, 45, None),  # short contexts: one partition per sequence
        (4, 45, 32),  # two partitions, the second partly empty for most sequences
        (3, 150, None),  # the default pick: several partitions of 64 tokens
        (3, 150, 7),  # 22 partitions misaligned with KV blocks: the merge takes two steps of BLOCK_P
    ],
)
def test_decode_matches_reference(B, max_len, partition_size, block_size, dtype, tol):
    H, hd = 2, 64
    lens = random_context_lens(B, max_len)
    k_cache, v_cache, tables, context_lens = paged_cache(lens, H, hd, block_size, dtype)
    q = fused_q(B, H, hd, dtype)
    scale = 1.0 / math.sqrt(hd)
    out = torch.full((B, H, hd), float("nan"), device=DEVICE, dtype=dtype)

    result = decode_attention(
        q, k_cache, v_cache, tables, context_lens, max_len, scale, out=out, partition_size=partition_size
    )

    assert result is out
    assert not out.isnan().any(), "unwritten output, or NaN cache slots outside the context were read"
    ref = decode_attention_ref(q, k_cache, v_cache, tables, context_lens, scale)
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"N{c.block_n}w{c.num_warps}s{c.num_stages}")
@pytest.mark.parametrize("partition_size", [None, 48])
def test_every_config_matches_reference(config, partition_size):
    """Each shipped launch shape (gpu_check sweeps them): steps wider than a KV block and than a partition tail."""
    lens = random_context_lens(3, 150)
    k_cache, v_cache, tables, context_lens = paged_cache(lens, 2, 64, 16, torch.float16)
    q = fused_q(3, 2, 64, torch.float16)
    out = torch.full_like(q, float("nan")).contiguous()
    decode_attention(q, k_cache, v_cache, tables, context_lens, 150, 0.125, out=out, partition_size=partition_size,
                     config=config)  # fmt: skip
    ref = decode_attention_ref(q, k_cache, v_cache, tables, context_lens, 0.125)
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("hd", [16, 32, 128])
def test_decode_other_head_dims(hd):
    lens = random_context_lens(3, 70)
    k_cache, v_cache, tables, context_lens = paged_cache(lens, 2, hd, 16, torch.float16)
    q = fused_q(3, 2, hd, torch.float16)
    out = decode_attention(q, k_cache, v_cache, tables, context_lens, 70, 0.2, partition_size=32)
    ref = decode_attention_ref(q, k_cache, v_cache, tables, context_lens, 0.2)
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("partition_size", [None, 16])
def test_decode_matches_torch_backend(partition_size):
    """Against the SDPA-based TorchOps path (which reads whole blocks, hence a cache without NaN)."""
    lens = random_context_lens(3, 60)
    k_cache, v_cache, tables, context_lens = paged_cache(lens, 3, 64, 16, torch.float32, poison=False)
    q = fused_q(3, 3, 64, torch.float32)
    ours = decode_attention(q, k_cache, v_cache, tables, context_lens, 60, 0.125, partition_size=partition_size)
    theirs = TorchOps().decode_attention(q, k_cache, v_cache, tables, context_lens, 60, 0.125)
    assert rel_err(ours, theirs) < 1e-5


@pytest.mark.parametrize("partition_size", [None, 16])
def test_empty_context_gives_zeros(partition_size):
    """A padding row (context_len 0, as in a padded CUDA-graph batch) yields zeros, not NaN."""
    k_cache, v_cache, tables, context_lens = paged_cache([40, 5], 2, 64, 16, torch.float16)
    context_lens[1] = 0
    q = fused_q(2, 2, 64, torch.float16)
    out = decode_attention(q, k_cache, v_cache, tables, context_lens, 40, 0.125, partition_size=partition_size)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref = decode_attention_ref(q[:1], k_cache, v_cache, tables[:1], context_lens[:1], 0.125)
    assert rel_err(out[:1], ref) < 2e-3


def test_bad_inputs_raise():
    k_cache, v_cache, tables, lens = paged_cache([5, 9], 2, 64, 16, torch.float16)
    q = fused_q(2, 2, 64, torch.float16)
    with pytest.raises(ValueError, match="block_tables"):
        decode_attention(q, k_cache, v_cache, tables.long(), lens, 9, 0.125)
    with pytest.raises(ValueError, match="context_lens"):
        decode_attention(q, k_cache, v_cache, tables, lens[:1], 9, 0.125)
    with pytest.raises(ValueError, match="max_context_len"):
        decode_attention(q, k_cache, v_cache, tables, lens, tables.shape[1] * 16 + 1, 0.125)
    with pytest.raises(ValueError, match="v_cache"):
        decode_attention(q, k_cache, v_cache.float(), tables, lens, 9, 0.125)
    with pytest.raises(ValueError, match="k_cache"):
        decode_attention(q, k_cache[:, :, :1].contiguous(), v_cache, tables, lens, 9, 0.125)
    with pytest.raises(ValueError, match="head dim"):
        q3 = torch.randn(2, 2, 48, device=DEVICE, dtype=torch.float16)
        c3 = torch.zeros(4, 16, 2, 48, device=DEVICE, dtype=torch.float16)
        decode_attention(q3, c3, c3.clone(), tables, lens, 9, 0.125)
    with pytest.raises(ValueError, match="partition_size"):
        decode_attention(q, k_cache, v_cache, tables, lens, 9, 0.125, partition_size=0)
    with pytest.raises(ValueError, match="config"):
        decode_attention(q, k_cache, v_cache, tables, lens, 9, 0.125, config=DecodeConfig(24, 4, 2))
    not_fp32 = next(c for c in CONFIGS if c not in FP32_CONFIGS)  # shipped for 16-bit caches only
    with pytest.raises(ValueError, match="config"):
        decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, lens, 9, 0.125, config=not_fp32)
