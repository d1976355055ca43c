"""The GEMM ``act(x @ W.T + bias) + residual`` that every weight format shares, up to how it reads W.

:mod:`kernels.linear` (float weights) and :mod:`kernels.quant` (int8, int4) are built from these pieces:

* :func:`tile_setup`, :func:`dot`, :func:`write_tile`: a program's tile (grouped "swizzle" order, its K range),
  the fp32 dot, and the fused epilogue (bias, GELU-tanh, residual) or the split-K partial store;
* :func:`gemm_kernel`: the GEMM body for float weights and, with ``W_INT8``, int8 codes;
* split-K (decode): with few rows (M <= 64) and few output tiles, a GPU with ~100+ SMs would run a handful of
  programs, each streaming its weight columns alone, far from memory bandwidth. K is then split into ``SPLIT_K``
  contiguous ranges (whole ``BLOCK_K`` steps each): program ``(tile, s)`` writes its fp32 partial sum to
  ``partials[s]`` of a ``[SPLIT_K, M, N]`` buffer, and :func:`splitk_epilogue_kernel` adds the partials in a fixed
  order (deterministic, no atomics) and applies the epilogue, which must follow the full sum since GELU is not
  linear. fp32 inputs (the parity path) never split by default;
* :class:`WeightFormat`: one weight format's launcher. Every format's kernel takes the same arguments but for
  the weight's own (:class:`GemmOperands`), so validation, split-K and the launch are written once, here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.gelu import gelu_tanh
from kernels.utils import FLOAT_DTYPES, cast, check_device, check_tensor, upcast_in_interpreter

ACTIVATIONS = (None, "gelu_tanh")
SMEM_LIMIT = 160 * 1024  # bytes of pipeline buffers a config may use: sm_80 allows 163 KB, sm_90 227 KB
SPLIT_K_MAX_M = 64  # split K only for decode-sized row counts
SPLIT_K_MIN_K = 256  # every split covers at least this many k
SPLIT_K_MAX = 16
SPLIT_K_WAVES = 3  # aim for tiles * SPLIT_K ~ this many programs per SM
SPLIT_K_BUCKETS = (1, 16, 32, 64)  # m_key buckets that may split: their configs need split-K specs
REDUCE_BLOCK_M, REDUCE_BLOCK_N, REDUCE_WARPS = 16, 64, 4  # the split-K epilogue kernel's one tile


def m_key(m: int) -> int:
    """Autotune bucket for the row count: powers of two, so ragged prefill batches don't retune every call."""
    return min(triton.next_power_of_2(max(m, 1)), 16384)


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (the interpreter never splits by default)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_split_k(m: int, n: int, k: int, num_sms: int, dtype: torch.dtype) -> int:
    """How many K ranges to split a GEMM into so that small-M GEMMs with few output tiles fill the GPU.

    Tiles are counted with the decode tile (16 x 64); when they are fewer than two waves, split until
    ``tiles * SPLIT_K`` is about ``SPLIT_K_WAVES`` waves, keeping each split at least ``SPLIT_K_MIN_K`` deep.
    fp32 (the parity path) and prefill-sized M never split.
    """
    if dtype == torch.float32 or m > SPLIT_K_MAX_M or num_sms <= 0:
        return 1
    tiles = triton.cdiv(m, 16) * triton.cdiv(n, 64)
    if tiles >= 2 * num_sms:
        return 1
    return max(1, min(SPLIT_K_WAVES * num_sms // tiles, k // SPLIT_K_MIN_K, SPLIT_K_MAX))


def check_split_k(split_k: int | None, dtype: torch.dtype, m: int, n: int, k: int, device: torch.device) -> int:
    """Validate an explicit ``split_k`` (a positive int; > 1 only for fp16/bf16), or pick one from the shape."""
    if split_k is None:
        return choose_split_k(m, n, k, sm_count(device), dtype)
    if not isinstance(split_k, int) or isinstance(split_k, bool) or split_k < 1:
        raise ValueError(f"split_k must be a positive int, got {split_k!r}")
    if split_k > 1 and dtype == torch.float32:
        raise ValueError(f"split_k={split_k} needs fp16/bf16 inputs; fp32 (the parity path) runs unsplit")
    return split_k


def check_epilogue(
    x: torch.Tensor,
    n: int,
    bias: torch.Tensor | None,
    activation: str | None,
    residual: torch.Tensor | None,
    out: torch.Tensor | None,
) -> list[tuple[str, torch.Tensor]]:
    """Validate x [M, K] and the epilogue operands for an output of N columns; returns them named, for devices."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    m = x.shape[0]
    named = [("x", x)]
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, contiguous=True)
        if bias.shape[0] != n:
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")
        named.append(("bias", bias))
    for name, t in (("residual", residual), ("out", out)):
        if t is not None:
            check_tensor(name, t, dtypes=(x.dtype,), ndim=2)
            if tuple(t.shape) != (m, n):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({m}, {n})")
            named.append((name, t))
    return named


# ------------------------------------------------------------------------------------------------ jit pieces


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` in fp32; fp32 operands use IEEE products, never TF32.

    UPCAST works around the interpreter's bf16 ``tl.dot`` bug (triton #11584) by multiplying in fp32.
    """
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _epilogue(
    acc,  # fp32 accumulator tile, shape (BLOCK_M, BLOCK_N)
    offs_m,  # row indices of the tile, shape (BLOCK_M,)
    offs_n,  # column indices of the tile, shape (BLOCK_N,)
    M,  # rows of the output
    N,  # columns of the output
    B,  # pointer to the bias, shape (N,) (unused unless HAS_BIAS)
    R,  # pointer to the residual, shape (M, N) (unused unless HAS_RESIDUAL)
    Y,  # pointer to the output, shape (M, N)
    stride_rm,  # residual row stride
    stride_rn,  # residual column stride
    stride_ym,  # output row stride
    stride_yn,  # output column stride
    HAS_BIAS: tl.constexpr,  # add B[n] to every row
    APPLY_GELU: tl.constexpr,  # apply GELU-tanh after the bias
    HAS_RESIDUAL: tl.constexpr,  # add R after the activation
):
    """``Y = act(acc + bias) + residual``, masked to the (M, N) bounds, cast to Y's dtype."""
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if APPLY_GELU:
        acc = gelu_tanh(acc)
    rows = offs_m.to(tl.int64)[:, None]
    mask = (offs_m[:, None] < M) & mask_n[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(R + rows * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + rows * stride_ym + offs_n[None, :] * stride_yn, cast(acc, Y.dtype.element_ty), mask=mask)


@triton.jit
def _split_range(K, BLOCK_K: tl.constexpr, SPLIT_K):
    """The ``BLOCK_K`` steps ``[lo, hi)`` of K that split ``program_id(1)`` of ``SPLIT_K`` reduces (may be empty)."""
    steps = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(steps, SPLIT_K)
    lo = tl.program_id(1) * per_split
    hi = tl.minimum(lo + per_split, steps)
    return lo, hi


@triton.jit
def _store_partial(
    acc,  # fp32 partial sum of one K range, shape (BLOCK_M, BLOCK_N)
    offs_m,  # row indices of the tile, shape (BLOCK_M,)
    offs_n,  # column indices of the tile, shape (BLOCK_N,)
    M,  # rows of the output
    N,  # columns of the output
    P,  # pointer to the fp32 partials, contiguous, shape (SPLIT_K, M, N); this split writes P[program_id(1)]
):
    """Store this split's fp32 partial tile, masked to the (M, N) bounds."""
    rows = (tl.program_id(1) * M + offs_m).to(tl.int64)[:, None]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(P + rows * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def splitk_epilogue_kernel(
    P,  # pointer to the fp32 partial sums, contiguous, shape (SPLIT_K, M, N)
    B,  # pointer to the bias, shape (N,) (unused unless HAS_BIAS)
    R,  # pointer to the residual, shape (M, N) (unused unless HAS_RESIDUAL)
    Y,  # pointer to the output, shape (M, N)
    M,  # rows of the output
    N,  # columns of the output
    SPLIT_K,  # number of partial sums
    stride_rm,  # R row stride
    stride_rn,  # R column stride
    stride_ym,  # Y row stride
    stride_yn,  # Y column stride
    HAS_BIAS: tl.constexpr,  # add the bias
    APPLY_GELU: tl.constexpr,  # GELU-tanh after the bias
    HAS_RESIDUAL: tl.constexpr,  # add the residual after the activation
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile
):
    """``Y = act(sum_s P[s] + bias) + residual``: the split-K reduction, in a fixed order, then the epilogue."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        rows = (s * M + offs_m).to(tl.int64)[:, None]  # rows of P viewed as (SPLIT_K * M, N)
        acc += tl.load(P + rows * N + offs_n[None, :], mask=mask, other=0.0)
    _epilogue(
        acc, offs_m, offs_n, M, N, B, R, Y, stride_rm, stride_rn, stride_ym, stride_yn,
        HAS_BIAS, APPLY_GELU, HAS_RESIDUAL,
    )  # fmt: skip


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map the 1-D program id to (pid_m, pid_n), walking GROUP_M row blocks per column for L2 reuse."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def tile_setup(
    M,  # rows of the output
    N,  # columns of the output
    K,  # reduction depth
    SPLIT_K,  # K ranges (grid axis 1); read only if PARTIAL
    PARTIAL: tl.constexpr,  # reduce only this program's K range
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # row tiles per L2 group
):
    """This program's tile: row and column indices, its ``BLOCK_K`` steps ``[k_lo, k_hi)``, and the rows of X and
    of the weight to read, out-of-range ones wrapped onto valid ones so only the K tail needs a load mask."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if PARTIAL:
        k_lo, k_hi = _split_range(K, BLOCK_K, SPLIT_K)
    else:
        k_lo, k_hi = 0, tl.cdiv(K, BLOCK_K)
    return offs_m, offs_n, k_lo, k_hi, (offs_m % M).to(tl.int64), (offs_n % N).to(tl.int64)


@triton.jit
def write_tile(
    acc,  # fp32 accumulator tile, shape (BLOCK_M, BLOCK_N)
    offs_m,  # row indices of the tile, shape (BLOCK_M,)
    offs_n,  # column indices of the tile, shape (BLOCK_N,)
    M,  # rows of the output
    N,  # columns of the output
    B,  # pointer to the bias, shape (N,) (unused unless HAS_BIAS)
    R,  # pointer to the residual, shape (M, N) (unused unless HAS_RESIDUAL)
    Y,  # pointer to the output, shape (M, N)
    P,  # pointer to the fp32 split-K partials, shape (SPLIT_K, M, N) (unused unless PARTIAL)
    stride_rm,  # residual row stride
    stride_rn,  # residual column stride
    stride_ym,  # output row stride
    stride_yn,  # output column stride
    HAS_BIAS: tl.constexpr,  # add B[n] to every row
    APPLY_GELU: tl.constexpr,  # apply GELU-tanh after the bias
    HAS_RESIDUAL: tl.constexpr,  # add R after the activation
    PARTIAL: tl.constexpr,  # split-K: store the partial sum to P (the epilogue runs after the reduction)
):
    """Finish a GEMM tile: the split's fp32 partial to P, or the epilogue into Y."""
    if PARTIAL:
        _store_partial(acc, offs_m, offs_n, M, N, P)
    else:
        _epilogue(
            acc, offs_m, offs_n, M, N, B, R, Y, stride_rm, stride_rn, stride_ym, stride_yn,
            HAS_BIAS, APPLY_GELU, HAS_RESIDUAL,
        )  # fmt: skip


@triton.jit
def gemm_kernel(
    X,  # pointer to the activations, shape (M, K)
    W,  # pointer to the weight, shape (N, K) (nn.Linear layout, any strides): X's dtype, or int8 codes if W_INT8
    S,  # pointer to the int8 per-output-channel scales, shape (N,) (unused unless W_INT8)
    B,  # pointer to the bias, shape (N,) (unused unless HAS_BIAS)
    R,  # pointer to the residual, shape (M, N) (unused unless HAS_RESIDUAL)
    Y,  # pointer to the output, shape (M, N)
    P,  # pointer to the fp32 split-K partials, shape (SPLIT_K, M, N) (unused unless PARTIAL)
    M,  # rows of X and Y (tokens)
    N,  # output features
    K,  # input features
    M_KEY,  # autotune bucket of M (power of two); not used by the kernel body
    SPLIT_K,  # K ranges (grid axis 1); 1 unless PARTIAL
    stride_xm,  # X row stride
    stride_xk,  # X column stride
    stride_wn,  # W row stride
    stride_wk,  # W column stride
    stride_rm,  # R row stride
    stride_rn,  # R column stride
    stride_ym,  # Y row stride
    stride_yn,  # Y column stride
    HAS_BIAS: tl.constexpr,  # add the bias
    APPLY_GELU: tl.constexpr,  # GELU-tanh after the bias
    HAS_RESIDUAL: tl.constexpr,  # add the residual after the activation
    UPCAST: tl.constexpr,  # interpreter only: multiply in fp32 (bf16 tl.dot bug)
    PARTIAL: tl.constexpr,  # split-K: reduce only this program's K range and store it to P (no epilogue)
    W_INT8: tl.constexpr,  # W holds int8 codes: convert them in registers, scale the sum by S[n]
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # output columns per tile
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # row tiles per L2 group
):
    """One GEMM body for float weights (:func:`kernels.linear.linear`) and int8 weights
    (:func:`kernels.quant.quant_linear`)."""
    offs_m, offs_n, k_lo, k_hi, rows_x, rows_w = tile_setup(
        M, N, K, SPLIT_K, PARTIAL, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
    )
    offs_k = tl.arange(0, BLOCK_K)
    # (BLOCK_M, BLOCK_K) x tile and (BLOCK_K, BLOCK_N) W^T tile at this split's first k. Where the split's scalar
    # offset goes matters for registers: int8 must add it last (folded into offs_k it spills on sm_80 at
    # 32 x 64 x 128), float weights must fold it (added last it spills on sm_90 at 16 x 32 x 256 with triton 3.6)
    if W_INT8:
        x_ptrs = X + rows_x[:, None] * stride_xm + offs_k[None, :] * stride_xk + k_lo * BLOCK_K * stride_xk
        w_ptrs = W + rows_w[None, :] * stride_wn + offs_k[:, None] * stride_wk + k_lo * BLOCK_K * stride_wk
    else:
        x_ptrs = X + rows_x[:, None] * stride_xm + (k_lo * BLOCK_K + offs_k)[None, :] * stride_xk
        w_ptrs = W + rows_w[None, :] * stride_wn + (k_lo * BLOCK_K + offs_k)[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_left = K - k_lo * BLOCK_K  # k from this step on; only the last step of K has a tail
    for _ in range(0, k_hi - k_lo):  # a zero-based trip count: range(k_lo, k_hi) spills a register on sm_90
        a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        if W_INT8:
            q = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)
            if UPCAST:  # the interpreter's int8 -> bf16 cast is broken too; dot multiplies in fp32 anyway
                b = q.to(tl.float32)
            else:
                b = q.to(a.dtype)  # |q| <= 127 is exact in fp16 and bf16 (one conversion per byte: ~HBM rate)
        else:
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = dot(a, b, acc, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        k_left -= BLOCK_K
    if W_INT8:
        acc *= tl.load(S + rows_w).to(tl.float32)[None, :]  # per-channel scale factors out of the K sum
    write_tile(
        acc, offs_m, offs_n, M, N, B, R, Y, P, stride_rm, stride_rn, stride_ym, stride_yn,
        HAS_BIAS, APPLY_GELU, HAS_RESIDUAL, PARTIAL,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------- launcher


@dataclass(frozen=True)
class GemmOperands:
    """A weight's own arguments to its GEMM kernel, which otherwise all take the same ones."""

    pointers: tuple[torch.Tensor, ...]  # after X: W, then the format's scales / zero points
    strides: tuple[int, ...]  # after X's strides: W's (row, column), then the format's
    constexprs: dict[str, object]  # the format's switches, e.g. W_INT8 or GROUP_SIZE


class WeightFormat:
    """One weight format's GEMM launcher; a subclass says how its weight becomes kernel arguments.

    Every format's kernel takes ``X, <pointers>, B, R, Y, P, M, N, K, M_KEY, SPLIT_K, stride_xm, stride_xk,
    <strides>, stride_rm, stride_rn, stride_ym, stride_yn`` and the epilogue constexprs, so :meth:`run` validates,
    picks split-K and launches for all of them. ``kernel`` is an instance attribute: tests swap in a copy that
    tunes every config.
    """

    name = ""  # "float", "int8", "int4": in messages
    arg = "weight"  # the launcher's name for the weight, in messages

    def __init__(self, kernel, configs) -> None:
        self.kernel = kernel  # the @autotune'd @triton.jit GEMM
        self.configs = configs  # () -> list[triton.Config]: the tiles it ships (tunes over, the gate compiles)

    def operands(self, weight) -> GemmOperands:
        """The weight's pointers, strides and constexprs for the kernel."""
        raise NotImplementedError

    def check(self, x: torch.Tensor, weight) -> None:
        """Format-specific checks of ``weight`` against ``x`` (after ``x`` itself is validated)."""

    def check_config(self, weight, config: triton.Config) -> None:
        """Raise ``ValueError`` unless ``config`` is a shipped tile that suits ``weight``."""
        if config not in self.configs():
            raise ValueError(f"config {config} is not one of the shipped {self.name} configs")

    def upcast(self, dtype: torch.dtype) -> bool:
        """Whether the kernel multiplies in fp32 (interpreter only: its bf16 ``tl.dot`` and int8 casts are wrong)."""
        return upcast_in_interpreter(dtype)

    def run(
        self,
        x: torch.Tensor,
        weight,
        bias: torch.Tensor | None,
        activation: str | None,
        residual: torch.Tensor | None,
        out: torch.Tensor | None,
        split_k: int | None = None,
        config: triton.Config | None = None,
    ) -> torch.Tensor:
        """``act(x @ weight.T + bias) + residual`` into ``out`` (or a new ``[M, N]`` tensor in x.dtype).

        ``split_k`` forces the number of K splits (None picks it from the shape); ``config`` (a shipped tile)
        runs that tile instead of autotuning.
        """
        n, k = weight.shape
        named = check_epilogue(x, n, bias, activation, residual, out)
        self.check(x, weight)
        if x.shape[1] != k:
            raise ValueError(f"x has {x.shape[1]} features but {self.arg} is {tuple(weight.shape)} (expects K={k})")
        operands = self.operands(weight)
        check_device(*named, (self.arg, operands.pointers[0]))
        m = x.shape[0]
        y = out if out is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
        if m == 0 or n == 0:
            return y
        if k == 0:
            raise ValueError(f"x and {self.arg} have K=0 features")
        split_k = check_split_k(split_k, x.dtype, m, n, k, x.device)
        kernel, tile = self.kernel, {}
        if config is not None:
            self.check_config(weight, config)
            kernel, tile = self.kernel.fn, config.all_kwargs()  # the jitted kernel itself, bypassing the autotuner
        r = residual if residual is not None else y
        b = bias if bias is not None else y
        epilogue = dict(
            HAS_BIAS=bias is not None, APPLY_GELU=activation == "gelu_tanh", HAS_RESIDUAL=residual is not None
        )

        def launch(partials: torch.Tensor | None) -> None:
            split = 1 if partials is None else split_k
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split)
            kernel[grid](
                x, *operands.pointers, b, r, y, y if partials is None else partials, m, n, k, m_key(m), split,
                x.stride(0), x.stride(1), *operands.strides, r.stride(0), r.stride(1), y.stride(0), y.stride(1),
                **epilogue, UPCAST=self.upcast(x.dtype), PARTIAL=partials is not None, **operands.constexprs, **tile,
            )  # fmt: skip

        if split_k == 1:  # the GEMM's own epilogue writes y
            launch(None)
            return y
        partials = torch.empty((split_k, m, n), dtype=torch.float32, device=y.device)
        launch(partials)
        grid = (triton.cdiv(m, REDUCE_BLOCK_M), triton.cdiv(n, REDUCE_BLOCK_N))
        splitk_epilogue_kernel[grid](
            partials, b, r, y, m, n, split_k, r.stride(0), r.stride(1), y.stride(0), y.stride(1),
            **epilogue, BLOCK_M=REDUCE_BLOCK_M, BLOCK_N=REDUCE_BLOCK_N, num_warps=REDUCE_WARPS,
        )  # fmt: skip
        return y
