"""The KV-cache store kernel: every kept token lands in its slot, skipped (-1) slots and the rest stay as they were."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_cache import store_kv, store_kv_ref
from tests.helpers import DEVICE


def fused_kv(T: int, H: int, hd: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v as strided [T, H, hd] views of a fused QKV projection [T, 3 * H * hd], as the model produces them."""
    qkv = torch.randn(T, 3 * H * hd, device=DEVICE).to(dtype)
    _, k, v = qkv.view(T, 3, H, hd).unbind(1)
    return k, v


def random_slots(T: int, num_slots: int, slot_dtype: torch.dtype) -> torch.Tensor:
    """Distinct random slots for T tokens, about a third of them -1 (skipped); the first token always kept."""
    slots = torch.randperm(num_slots, device=DEVICE)[:T]
    skip = torch.rand(T, device=DEVICE) < 0.33
    skip[0] = False
    return torch.where(skip, -1, slots).to(slot_dtype)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T, H, hd, block_size", [(1, 1, 64, 16), (7, 3, 32, 16), (37, 2, 64, 32), (20, 5, 16, 32)])
def test_store_kv_matches_reference(T, H, hd, block_size, dtype, slot_dtype):
    k, v = fused_kv(T, H, hd, dtype)
    num_blocks = (T + block_size - 1) // block_size + 2
    k_cache = torch.randn(num_blocks, block_size, H, hd, device=DEVICE).to(dtype)  # stale contents
    v_cache = torch.randn(num_blocks, block_size, H, hd, device=DEVICE).to(dtype)
    slots = random_slots(T, num_blocks * block_size, slot_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    store_kv(k, v, k_cache, v_cache, slots)
    store_kv_ref(k, v, k_ref, v_ref, slots)

    assert torch.equal(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)
    # The kept tokens really moved (the stale cache was random, so a no-op kernel fails here).
    kept = slots[slots >= 0].long()
    assert torch.equal(k_cache.view(-1, H, hd)[kept], k[(slots >= 0)])
    assert torch.equal(v_cache.view(-1, H, hd)[kept], v[(slots >= 0)])


def test_all_skipped_leaves_cache_untouched():
    k, v = fused_kv(5, 2, 64, torch.float16)
    k_cache = torch.full((2, 16, 2, 64), float("nan"), device=DEVICE, dtype=torch.float16)
    v_cache = torch.randn(2, 16, 2, 64, device=DEVICE).to(torch.float16)
    v_before = v_cache.clone()
    store_kv(k, v, k_cache, v_cache, torch.full((5,), -1, dtype=torch.int32, device=DEVICE))
    assert k_cache.isnan().all()
    assert torch.equal(v_cache, v_before)


def test_bad_inputs_raise():
    k, v = fused_kv(4, 2, 64, torch.float16)
    cache = torch.zeros(2, 16, 2, 64, device=DEVICE, dtype=torch.float16)
    slots = torch.arange(4, device=DEVICE, dtype=torch.int32)
    with pytest.raises(ValueError, match="k_cache"):
        store_kv(k, v, cache.float(), cache, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(k, v, cache, cache.clone(), slots.float())
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(k, v, cache, cache.clone(), slots[:3])
    with pytest.raises(ValueError, match="k_cache"):
        store_kv(k, v, torch.zeros(2, 16, 3, 64, device=DEVICE, dtype=torch.float16), cache, slots)
    with pytest.raises(ValueError, match="contiguous"):
        store_kv(k, v, cache.transpose(0, 1), cache, slots)
    with pytest.raises(ValueError, match="last dim"):
        store_kv(k.transpose(1, 2).contiguous().transpose(1, 2), v, cache, cache.clone(), slots)
