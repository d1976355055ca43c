"""TorchOps' paged KV paths (the CPU backend's store and decode attention, each through the CPU kernels and through
PyTorch's ops) against the kernels' float64 references, on caches poisoned with NaN wherever no context
token lives; and its per-step reuse of index math across layers."""

from __future__ import annotations

import pytest
import torch

from engine import cpu_kernels
from engine.torch_ops import TorchOps
from kernels.kv_cache import store_kv_ref
from kernels.paged_attention import decode_attention_ref
from tests.helpers import rel_err
from tests.kernels.test_kv_cache import fused_kv, random_slots
from tests.kernels.test_paged_attention import fused_q, paged_cache, random_context_lens

DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)]


def pytorch_path(monkeypatch):
    """Decode attention and the KV store through PyTorch's ops (a gathered context and SDPA, ``index_copy_``), not
    the CPU kernels."""
    monkeypatch.setattr(cpu_kernels, "attention_supports", lambda k_cache: False)
    monkeypatch.setattr(cpu_kernels, "store_supports", lambda k, k_cache: False)


@pytest.fixture(params=["cpu_kernel", "pytorch"])
def path(request, monkeypatch):
    if request.param == "cpu_kernel" and not cpu_kernels.available():
        pytest.skip("the CPU kernels need x86-64 with AVX2 and a C++ compiler")
    if request.param == "pytorch":
        pytorch_path(monkeypatch)
    return request.param


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("B, max_len", [(1, 1), (1, 37), (4, 45), (3, 70)])
def test_decode_attention_matches_reference(B, max_len, dtype, tol, path):
    """Batch 1 fills max_context_len (no mask); ragged batches read their first slot past their context, which a
    NaN there would expose."""
    lens = random_context_lens(B, max_len)
    k_cache, v_cache, tables, context_lens = paged_cache(lens, 2, 64, 16, dtype)
    q = fused_q(B, 2, 64, dtype)
    out = TorchOps().decode_attention(q, k_cache, v_cache, tables, context_lens, max_len, 0.125)
    assert out.shape == q.shape and out.is_contiguous()
    assert rel_err(out, decode_attention_ref(q, k_cache, v_cache, tables, context_lens, 0.125)) < tol


def test_decode_index_is_reused_across_layers_and_redone_when_changed(monkeypatch):
    """Two layers share a step's tables (one index computation); lengths grown in place, or new tensors, are seen."""
    pytorch_path(monkeypatch)  # the index is the PyTorch path's
    ops = TorchOps()
    k_cache, v_cache, tables, context_lens = paged_cache(random_context_lens(3, 40), 2, 64, 16, torch.float32)
    # a second layer: other values in the same slots, NaN in the same places
    layers = [(k_cache, v_cache)] + [tuple(torch.randn_like(c).masked_fill(c.isnan(), float("nan")) for c in
                                           (k_cache, v_cache))]  # fmt: skip
    q = fused_q(3, 2, 64, torch.float32)
    index = None
    for k_layer, v_layer in layers:
        out = ops.decode_attention(q, k_layer, v_layer, tables, context_lens, 40, 0.125)
        assert rel_err(out, decode_attention_ref(q, k_layer, v_layer, tables, context_lens, 0.125)) < 1e-5
        assert index is None or ops._memos["decode"][0] is index  # the second layer reused the first's
        index = ops._memos["decode"][0]

    out = ops.decode_attention(q, k_cache, v_cache, tables, context_lens, 48, 0.125)  # a longer max_context_len
    assert rel_err(out, decode_attention_ref(q, k_cache, v_cache, tables, context_lens, 0.125)) < 1e-5

    other = context_lens.clone()
    context_lens[0] -= 7  # the same tensor, changed in place
    context_lens[1] = 1
    out = ops.decode_attention(q, k_cache, v_cache, tables, context_lens, 40, 0.125)
    assert rel_err(out, decode_attention_ref(q, k_cache, v_cache, tables, context_lens, 0.125)) < 1e-5
    other[0] = 20  # another tensor
    out = ops.decode_attention(q, k_cache, v_cache, tables, other, 40, 0.125)
    assert rel_err(out, decode_attention_ref(q, k_cache, v_cache, tables, other, 0.125)) < 1e-5


@pytest.mark.parametrize("skipped", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_matches_reference_across_layers(skipped, dtype, path):
    """One slot mapping for every layer of a step, all kept (a decode step) or some skipped (-1)."""
    ops = TorchOps()
    T, H, hd, block_size, num_blocks = 9, 2, 64, 16, 3
    slots = random_slots(T, num_blocks * block_size, torch.int64)
    if not skipped:
        slots = torch.randperm(num_blocks * block_size)[:T]
    for _layer in range(2):
        k, v = fused_kv(T, H, hd, dtype)
        k_cache = torch.randn(num_blocks, block_size, H, hd).to(dtype)  # stale contents
        v_cache = torch.randn(num_blocks, block_size, H, hd).to(dtype)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        ops.store_kv(k, v, k_cache, v_cache, slots)
        store_kv_ref(k, v, k_ref, v_ref, slots)
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    slots[0] = -1  # changed in place: the first token is no longer stored
    k, v = fused_kv(T, H, hd, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ops.store_kv(k, v, k_cache, v_cache, slots)
    store_kv_ref(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
