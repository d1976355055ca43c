"""Store the keys and values of this step's tokens into the paged KV cache, by slot.

Each token ``t`` carries a slot ``slot_mapping[t] = block * block_size + offset`` in the cache
``[num_blocks, block_size, H, hd]`` (``-1`` = padding, skip). ``k`` and ``v`` are usually column slices of
the fused QKV projection ``[T, 3 * H * hd]``, so the kernel reads them through their strides, no copy.
One program stores one token: ``H * hd`` contiguous elements of K and of V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.utils import FLOAT_DTYPES, check_device, check_tensor, row_block

SLOT_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _store_kv_kernel(
    K,  # pointer to this step's keys, shape (T, H, HEAD_DIM), last dim contiguous
    V,  # pointer to this step's values, shape (T, H, HEAD_DIM), last dim contiguous
    K_cache,  # pointer to the key cache, contiguous (num_blocks, block_size, H, HEAD_DIM)
    V_cache,  # pointer to the value cache, contiguous (num_blocks, block_size, H, HEAD_DIM)
    slot_mapping,  # pointer to the cache slot of each token, shape (T,), int32 or int64; -1 = skip
    stride_kt,  # elements between consecutive tokens of K
    stride_kh,  # elements between consecutive heads of K
    stride_vt,  # elements between consecutive tokens of V
    stride_vh,  # elements between consecutive heads of V
    row_size,  # H * HEAD_DIM: elements of one token in the cache
    HEAD_DIM: tl.constexpr,  # head dimension hd
    BLOCK_SIZE: tl.constexpr,  # power of two >= row_size: one token's K (or V) row per program
):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK_SIZE)
    mask = offs < row_size
    head = offs // HEAD_DIM
    dim = offs % HEAD_DIM
    t64 = t.to(tl.int64)
    k = tl.load(K + t64 * stride_kt + head * stride_kh + dim, mask=mask)
    v = tl.load(V + t64 * stride_vt + head * stride_vh + dim, mask=mask)
    tl.store(K_cache + slot * row_size + offs, k, mask=mask)
    tl.store(V_cache + slot * row_size + offs, v, mask=mask)


def check_kv_cache(
    k: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> list[tuple[str, torch.Tensor]]:
    """Validate a paged cache pair and the slots of ``k``'s tokens (``[T, H, hd]``); returns them named."""
    check_tensor("k_cache", k_cache, dtypes=(k.dtype,), ndim=4, contiguous=True)
    check_tensor("v_cache", v_cache, dtypes=(k.dtype,), ndim=4, contiguous=True)
    check_tensor("slot_mapping", slot_mapping, dtypes=SLOT_DTYPES, ndim=1)
    T, H, hd = k.shape
    if k_cache.shape[2:] != (H, hd) or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} must both be "
            f"[num_blocks, block_size, {H}, {hd}]"
        )
    if slot_mapping.shape[0] != T:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {T} tokens")
    return [("k_cache", k_cache), ("v_cache", v_cache), ("slot_mapping", slot_mapping)]


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``k, v [T, H, hd]`` into ``k_cache, v_cache [num_blocks, block_size, H, hd]`` at ``slot_mapping``."""
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("v", v, dtypes=(k.dtype,), ndim=3)
    check_device(("k", k), ("v", v), *check_kv_cache(k, k_cache, v_cache, slot_mapping))
    T, H, hd = k.shape
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)}, expected k's {tuple(k.shape)}")
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError(f"k and v need a contiguous last dim (strides {k.stride()}, {v.stride()})")
    if T == 0:
        return
    BLOCK_SIZE, num_warps = row_block(H * hd)
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), H * hd,
        HEAD_DIM=hd, BLOCK_SIZE=BLOCK_SIZE, num_warps=num_warps,
    )  # fmt: skip


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Reference: token ``t`` goes to block ``slot // block_size``, row ``slot % block_size``; ``-1`` skips."""
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[slot // block_size, slot % block_size] = k[t]
            v_cache[slot // block_size, slot % block_size] = v[t]
