"""Fused causal prefill attention over ragged batches, against a float64 per-sequence softmax reference."""

from __future__ import annotations

import math

import pytest
import torch

from engine import cpu_onednn
from engine.torch_ops import TorchOps
from kernels import attention
from kernels.attention import fits, get_configs, keep, prefill_attention, prefill_attention_ref
from kernels.kv_cache import store_kv_ref
from tests.helpers import DEVICE, rel_err, tuning_every_config

DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)]


def ragged_batch(B: int, max_len: int) -> tuple[list[int], torch.Tensor]:
    """Fresh random lengths in [1, max_len], with one sequence of exactly max_len and (if B > 1) one of length 1."""
    lens = torch.randint(1, max_len + 1, (B,)).tolist()
    lens[torch.randint(0, B, ()).item()] = max_len
    if B > 1:
        lens[(lens.index(max_len) + 1) % B] = 1
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return lens, cu


def fused_qkv(T: int, H: int, hd: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as strided [T, H, hd] views of one fused projection [T, 3 * H * hd] (no copies)."""
    qkv = torch.randn(T, 3 * H * hd, device=DEVICE).to(dtype)
    q, k, v = qkv.view(T, 3, H, hd).unbind(1)
    assert q.stride() == (3 * H * hd, hd, 1)
    return q, k, v


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("B, max_len, H", [(1, 1, 2), (1, 49, 1), (3, 40, 2), (4, 75, 3)])
def test_prefill_matches_reference(B, max_len, H, dtype, tol):
    hd = 64
    lens, cu = ragged_batch(B, max_len)
    T = sum(lens)
    q, k, v = fused_qkv(T, H, hd, dtype)
    scale = 1.0 / math.sqrt(hd)
    out = torch.full((T, H, hd), float("nan"), device=DEVICE, dtype=dtype)

    result = prefill_attention(q, k, v, cu, max_len, scale, out=out)

    assert result is out
    assert not out.isnan().any(), "some output rows were never written"
    assert rel_err(out, prefill_attention_ref(q, k, v, cu, scale)) < tol


@pytest.mark.parametrize("hd", [16, 32, 128])
def test_prefill_other_head_dims(hd):
    lens, cu = ragged_batch(2, 37)
    q, k, v = fused_qkv(sum(lens), 2, hd, torch.float16)
    out = prefill_attention(q, k, v, cu, 37, 0.3)
    assert out.shape == q.shape and out.is_contiguous()
    assert rel_err(out, prefill_attention_ref(q, k, v, cu, 0.3)) < 2e-3


def paged_cache(T: int, H: int, hd: int, dtype: torch.dtype, slot_dtype=torch.int64, block_size: int = 16):
    """A K/V cache pair with stale random contents, and distinct random slots for T tokens, about a third -1."""
    num_blocks = -(-T // block_size) + 2
    k_cache = torch.randn(num_blocks, block_size, H, hd, device=DEVICE).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, H, hd, device=DEVICE).to(dtype)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:T]
    slots = torch.where(torch.rand(T, device=DEVICE) < 0.33, -1, slots).to(slot_dtype)
    return k_cache, v_cache, slots


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_prefill_stores_kv_in_the_same_pass(dtype, tol, slot_dtype):
    """kv_cache=...: every token with a slot lands in the cache exactly as store_kv puts it, every other slot
    keeps its contents, and the attention output is unchanged."""
    lens, cu = ragged_batch(3, 45)
    T, H, hd = sum(lens), 2, 64
    q, k, v = fused_qkv(T, H, hd, dtype)
    k_cache, v_cache, slots = paged_cache(T, H, hd, dtype, slot_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(k, v, k_ref, v_ref, slots)

    out = prefill_attention(q, k, v, cu, 45, 0.125, kv_cache=(k_cache, v_cache, slots))

    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert rel_err(out, prefill_attention_ref(q, k, v, cu, 0.125)) < tol


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_every_tuned_config_matches_reference(monkeypatch, dtype, tol):
    """Each tile the autotuner may pick on a GPU (the interpreter otherwise runs only the first), run through
    Triton's tuning path: the output and the fused cache store are right for every one. Sequences longer than
    the largest BLOCK_M take both the off-diagonal and the diagonal loops."""
    lens, cu = ragged_batch(3, 150)
    T, H, hd = sum(lens), 2, 64
    q, k, v = fused_qkv(T, H, hd, dtype)
    k_cache, v_cache, slots = paged_cache(T, H, hd, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(k, v, k_ref, v_ref, slots)
    ref = prefill_attention_ref(q, k, v, cu, 0.125)
    out = torch.empty_like(q).contiguous()
    written = torch.isin(torch.arange(k_cache.shape[0] * k_cache.shape[1], device=DEVICE), slots)

    def check(run):
        out.fill_(float("nan"))
        k_cache.view(-1, H, hd)[written] = float("nan")
        v_cache.view(-1, H, hd)[written] = float("nan")
        run()
        assert rel_err(out, ref) < tol, f"config #{len(timed)}"
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref), f"config #{len(timed)}"

    configs = [c for c in get_configs() if keep(c)]
    tuned, timed = tuning_every_config(attention._prefill_attention_kernel, configs, check)
    monkeypatch.setattr(attention, "_prefill_attention_kernel", tuned)
    prefill_attention(q, k, v, cu, 150, 0.125, out=out, kv_cache=(k_cache, v_cache, slots))
    assert rel_err(out, ref) < tol
    assert len(timed) == sum(fits(c, hd, dtype == torch.float32) for c in configs) > 1


def test_prefill_launches_in_chunks_past_the_grid_limit(monkeypatch):
    """(sequence, head) pairs past CUDA's 65535 grid rows launch in chunks of sequences: here 3 heads and a
    limit of 7 give chunks of 2 sequences out of 5, the last one alone; the cache store follows the chunks."""
    monkeypatch.setattr(attention, "MAX_GRID_Y", 7)
    lens, cu = ragged_batch(5, 30)
    q, k, v = fused_qkv(sum(lens), 3, 64, torch.float16)
    k_cache, v_cache, slots = paged_cache(sum(lens), 3, 64, torch.float16)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(k, v, k_ref, v_ref, slots)
    out = torch.full_like(q, float("nan")).contiguous()
    prefill_attention(q, k, v, cu, 30, 0.125, out=out, kv_cache=(k_cache, v_cache, slots))
    assert rel_err(out, prefill_attention_ref(q, k, v, cu, 0.125)) < 2e-3
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_prefill_matches_torch_backend():
    """Against the SDPA-based TorchOps path the engine runs on CPU (an implementation independent of ours)."""
    lens, cu = ragged_batch(3, 33)
    q, k, v = fused_qkv(sum(lens), 2, 64, torch.float32)
    ours = prefill_attention(q, k, v, cu, 33, 0.125)
    theirs = TorchOps().prefill_attention(q, k, v, cu, 33, 0.125)
    assert rel_err(ours, theirs) < 1e-5


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_torch_backend_prefill_matches_reference(dtype, tol, amx, monkeypatch):
    """TorchOps' one causal SDPA call a sequence, in every dtype, over ragged sequences: 16-bit through fp32, or bf16
    natively as on a CPU with AMX (either way on any CPU)."""
    monkeypatch.setattr(cpu_onednn, "HAS_AMX", amx)
    lens, cu = ragged_batch(4, 23)
    q, k, v = fused_qkv(sum(lens), 2, 64, dtype)
    out = TorchOps().prefill_attention(q, k, v, cu, 23, 0.125)
    assert out.shape == q.shape and out.is_contiguous()
    assert rel_err(out, prefill_attention_ref(q, k, v, cu, 0.125)) < tol


def test_prefill_is_causal_and_per_sequence():
    """Changing a later token, or another sequence, must not change earlier outputs of a sequence."""
    cu = torch.tensor([0, 20, 35], dtype=torch.int32, device=DEVICE)  # lengths 20 and 15
    q, k, v = fused_qkv(35, 2, 64, torch.float32)
    before = prefill_attention(q, k, v, cu, 20, 0.125)
    k2, v2 = k.clone(), v.clone()
    k2[10:] += 1.0  # token 10 of sequence 0 onwards, and all of sequence 1
    v2[10:] -= 1.0
    after = prefill_attention(q, k2, v2, cu, 20, 0.125)
    assert torch.equal(before[:10], after[:10])
    assert not torch.allclose(before[10:20], after[10:20])


def test_bad_inputs_raise():
    q, k, v = fused_qkv(8, 2, 64, torch.float16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="cu_seqlens"):
        prefill_attention(q, k, v, cu.long(), 5, 0.125)
    with pytest.raises(ValueError, match="k has dtype"):
        prefill_attention(q, k.float(), v, cu, 5, 0.125)
    with pytest.raises(ValueError, match="head dim"):
        q3, k3, v3 = fused_qkv(8, 2, 48, torch.float16)
        prefill_attention(q3, k3, v3, cu, 5, 0.125)
    with pytest.raises(ValueError, match="last dim"):
        prefill_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, cu, 5, 0.125)
    with pytest.raises(ValueError, match="max_seqlen"):
        prefill_attention(q, k, v, cu, 9, 0.125)
    with pytest.raises(ValueError, match="out"):
        prefill_attention(q, k, v, cu, 5, 0.125, out=torch.empty(8, 2, 32, device=DEVICE, dtype=torch.float16))
    k_cache, v_cache, slots = paged_cache(8, 2, 64, torch.float16)
    with pytest.raises(ValueError, match="slot_mapping"):
        prefill_attention(q, k, v, cu, 5, 0.125, kv_cache=(k_cache, v_cache, slots[:5]))
    with pytest.raises(ValueError, match="k_cache"):
        prefill_attention(q, k, v, cu, 5, 0.125, kv_cache=(k_cache.float(), v_cache, slots))
