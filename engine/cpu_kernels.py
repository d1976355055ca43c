"""The torch backend's CPU kernels, hand-written in C++ with AVX2 + FMA + F16C intrinsics (``engine/csrc/``): the
GEMM of every linear (fp32 activations against fp32, fp16, bf16 or int8 weights), paged decode attention and the
KV store. On a CPU with AVX-512 the library is built for it (:data:`ISA_FLAGS`), and the float GEMM's loop runs on
16 lanes. Packed float weights (every block linear) are strips of 16 rows (AVX2: 8) multiplied as outer products,
8 activation rows x 3 strips a tile: on 2 Xeon cores (AMX, AVX-512; 2026-12-01) gpt2's block GEMMs in fp32 ran at
216, 304-307 and 346-351 GFLOP/s at M = 8, 32 and 2048, where the tiles of partial sums before them ran at 176,
275-284 and 289-290 (MKL: 210 at M = 32). The int8 GEMM's 32-code steps (AVX-512) took 0.74-0.87x the AVX2 build's
time at M = 1 and 0.67-0.81x at M = 8. Every GEMV prefetches its weights ahead (fp16 strips at M = 1: 0.85x the
time), and the tiles of row-major and int8 weights go a panel of activation rows at a time above M = 1, a panel
half a core's L2 (0.75-0.87x at M = 256). On a CPU with AMX, :class:`GemmWeight` hands bf16 calls of 6 rows or
more to oneDNN's AMX GEMM instead (:mod:`engine.cpu_onednn`), about 10x faster at prefill sizes.

Why: decode on a CPU reads every weight once a token, so a step lasts as long as its GEMVs take to stream the
weights, and PyTorch's CPU GEMMs leave bandwidth unused at small M. gpt2-medium's 96 block GEMMs through
``TorchOps.linear`` (2 Zen 3 cores, AVX2, 2026-12-01, interleaved, min of four rounds; PyTorch's path after the
slash): fp32 38 / 58 ms at M = 1 and 67 / 96 at M = 8 (oneDNN packed); fp16 25 / 29 and 53 / 62 (fbgemm packed);
int8 16 / 26 and 42 / 90 (``_weight_int8pack_mm``). Float weights are packed once at load (:class:`GemmWeight`).

int8 multiplies int16 activation codes (rounded per row, 15 bits: far finer than the bf16 activations
``_weight_int8pack_mm`` needs) with the weight codes in exact int32 sums. Decode attention reads each sequence's keys
and values in place through its block table, token by token over a run of heads, where the torch path gathers a
copy of the context (and, for 16-bit caches, converts it to fp32) for SDPA: one layer at 8 sequences of 1000 tokens
took 3.7 / 10.9 ms in fp32 and 2.0 / 19.1 ms in bf16. The KV store copies a step's rows in one call, where
``index_copy_`` took 60-140 us a layer.

The library is built on first use with the system's C++ compiler (``$CXX``, else ``c++``), a few seconds, into
``$GPT2_TRITON_CACHE_DIR`` (default ``~/.cache/gpt2-triton``) under a name hashed from the sources, the flags and
the compiler, then loaded with ctypes. It runs its loops on PyTorch's own OpenMP threads (``torch.get_num_threads()``
of them): torch's wheels ship ``libgomp.so.1``, which the library's own ``libgomp.so.1`` dependency resolves to.
Where it can't run (not x86-64 with AVX2, no compiler, a failed build, or ``GPT2_TRITON_CPU_KERNELS=0``),
:func:`available` is False, one warning says why if a build failed, and the torch backend runs PyTorch's ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from engine import cpu_onednn

SOURCE_DIR = Path(__file__).with_name("csrc")
SOURCES = (SOURCE_DIR / "gemm.cpp", SOURCE_DIR / "decode_attention.cpp", SOURCE_DIR / "store_kv.cpp")
HEADERS = (SOURCE_DIR / "simd.h",)
FLAGS = ("-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC")
# The instruction sets the library is built for, each with its compiler flags: AVX-512 (16-lane GEMM) where the CPU
# has it (PyTorch's "AVX512" capability: F, BW, VL and DQ), else AVX2.
ISA_FLAGS = {
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "avx512": ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"),
}
KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}  # simd.h's enum Kind
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # activations (x, bias, residual, output) and KV caches
K_MULTIPLE = 16  # the GEMM's K must be a multiple of this (gpt2_cpu_gemm_k_multiple)
HEAD_DIM_MULTIPLE = 8  # decode attention's head size: a multiple of this, at most MAX_HEAD_DIM
MAX_HEAD_DIM = 256  # gpt2_cpu_decode_attention_max_head_dim
SWITCH_ENV = "GPT2_TRITON_CPU_KERNELS"  # "0" turns the kernels off
ISA_ENV = "GPT2_TRITON_CPU_ISA"  # "avx2" or "avx512": the build to run (default: the best this CPU runs)
CACHE_ENV = "GPT2_TRITON_CACHE_DIR"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gpt2-triton")


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX") or "c++")


def flags(isa: str) -> tuple[str, ...]:
    return FLAGS + ISA_FLAGS[isa]


def library_path(cxx: str, isa: str) -> Path:
    """Where the library built from these sources for ``isa`` with this compiler lives."""
    digest = hashlib.sha256(" ".join(flags(isa)).encode() + cxx.encode())
    for path in SOURCES + HEADERS:
        digest.update(path.read_bytes())
    return cache_dir() / f"cpu_kernels-{isa}-{digest.hexdigest()[:16]}.so"


def build(cxx: str, isa: str, target: Path) -> None:
    """Compile into a temporary file beside ``target`` and move it there: two processes building at once each
    end with a whole library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        command = [cxx, *flags(isa), *map(str, SOURCES), "-o", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {result.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def runnable_isas() -> tuple[str, ...]:
    """The instruction sets of ISA_FLAGS this CPU runs, best last: x86-64 with AVX2 (PyTorch reports AVX2 only with
    FMA; every AVX2 CPU has F16C), and AVX-512 where PyTorch reports it."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ()
    return {"AVX2": ("avx2",), "AVX512": ("avx2", "avx512")}.get(torch.backends.cpu.get_cpu_capability(), ())


def chosen_isa() -> str | None:
    """``$GPT2_TRITON_CPU_ISA`` where set (None if this CPU can't run it), else the best this CPU runs."""
    asked, runnable = os.environ.get(ISA_ENV), runnable_isas()
    if asked is None:
        return runnable[-1] if runnable else None
    if asked not in ISA_FLAGS:
        raise ValueError(f"{ISA_ENV}={asked!r}: expected one of {sorted(ISA_FLAGS)}")
    return asked if asked in runnable else None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built, loaded library for :func:`chosen_isa`, or None where it can't run (a failed build warns once, with
    the reason). Cached: a change to the environment takes effect after ``library.cache_clear()``."""
    isa = chosen_isa()
    if os.environ.get(SWITCH_ENV) == "0" or isa is None:
        return None
    cxx = compiler()
    if cxx is None:
        return None
    target = library_path(cxx, isa)
    try:
        if not target.exists():
            build(cxx, isa, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"the CPU kernels are not used ({e}); the torch backend runs PyTorch's ops", stacklevel=2)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_long
    lib.gpt2_cpu_gemm.restype = ctypes.c_int
    lib.gpt2_cpu_gemm.argtypes = [
        ctypes.c_int, pointer, pointer, ctypes.c_int, pointer, pointer, *[size] * 3, pointer, pointer,
        *[ctypes.c_int] * 3,
    ]  # fmt: skip
    lib.gpt2_cpu_decode_attention.restype = ctypes.c_int
    lib.gpt2_cpu_decode_attention.argtypes = [
        ctypes.c_int, *[pointer] * 4, size, pointer, pointer, *[size] * 5, ctypes.c_float, ctypes.c_int
    ]  # fmt: skip
    lib.gpt2_cpu_store_kv.restype = ctypes.c_int
    lib.gpt2_cpu_store_kv.argtypes = [pointer, pointer, size, size, pointer, pointer, size, pointer, size]
    limits = (
        lib.gpt2_cpu_gemm_k_multiple(),
        lib.gpt2_cpu_decode_attention_max_head_dim(),
    )
    if limits != (K_MULTIPLE, MAX_HEAD_DIM) or K_MULTIPLE % lib.gpt2_cpu_gemm_pack_lanes():
        raise RuntimeError(f"{target} disagrees with engine/cpu_kernels.py on its limits: {limits}")
    lib.isa = isa
    return lib


def available() -> bool:
    return library() is not None


def gemm_supports(weight: torch.Tensor) -> bool:
    """Whether :class:`GemmWeight` takes this weight: a 2-D CPU tensor of a dtype it reads, K a multiple of 16, and the
    library available."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in KINDS
        and weight.dim() == 2
        and weight.shape[1] % K_MULTIPLE == 0
        and available()
    )


class GemmWeight:
    """A CPU linear weight ``[N, K]`` for the GEMM: fp32, fp16 or bf16 values, or int8 codes with fp32 per-row
    ``scales``. Checked once here, so that a call checks only what it is given.

    Float weights are packed by default: a copy in strips of ``lanes`` rows (the library's vector width: 8, or 16
    with AVX-512) whose values at each k lie side by side, which the GEMM multiplies as outer products (one load of
    weights for several activation rows, every output one FMA chain along k: about 1.25x the GFLOP/s of row-major
    tiles on gpt2's shapes above M = 1). ``pack=False`` reads ``weight`` in place, row-major, with partial sums along
    k (other bits than packed, and as batch-invariant): the tied LM head, whose storage is the embedding's, would
    otherwise be held twice.

    ``onednn``: whether bf16 calls of :data:`cpu_onednn.MIN_ROWS` rows or more go to oneDNN's GEMM (AMX) instead,
    on the same row-major weight (never packed then); by default where :func:`cpu_onednn.chosen` says so, for bf16
    weights. True where oneDNN can't run it is a ``ValueError``."""

    def __init__(
        self, weight: torch.Tensor, scales: torch.Tensor | None = None, pack: bool = True, onednn: bool | None = None
    ) -> None:
        if not gemm_supports(weight):
            raise ValueError(f"the CPU GEMM does not take a {weight.dtype} weight of shape {tuple(weight.shape)}")
        n = weight.shape[0]
        if (weight.dtype == torch.int8) != (scales is not None):
            raise ValueError("scales go with int8 weights, and only with them")
        if scales is not None and (scales.dtype != torch.float32 or scales.shape != (n,) or not scales.is_contiguous()):
            raise ValueError(f"scales must be a contiguous fp32 tensor of shape ({n},)")
        bf16 = weight.dtype == torch.bfloat16
        if onednn and not bf16:
            raise ValueError(f"onednn=True takes bf16 weights, not {weight.dtype}")
        if onednn and not cpu_onednn.runs_bf16():
            raise ValueError("onednn=True, but PyTorch's oneDNN does not run bf16 GEMMs on this CPU")
        self.onednn = bf16 and cpu_onednn.chosen() if onednn is None else onednn
        self.library = library()  # the weights are laid out for this build's vector width
        self.lanes = self.library.gpt2_cpu_gemm_pack_lanes()
        self.packed = pack and scales is None and not self.onednn
        self.weight = _pack(weight, self.lanes) if self.packed else weight.contiguous()  # [N, K], in the GEMM's order
        self.scales = scales
        self.kind = KINDS[weight.dtype]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a plain ``[N, K]`` tensor in ``dtype`` (int8 codes times their scales), for code that can't
        call the kernel (a graph ``torch.compile`` traces)."""
        weight = _unpack(self.weight, self.lanes) if self.packed else self.weight
        if self.scales is None:
            return weight.to(dtype)
        return (weight.float() * self.scales[:, None]).to(dtype)

    def _for_onednn(self, x: torch.Tensor, gelu: bool, residual: torch.Tensor | None) -> bool:
        """Whether oneDNN computes this call (see :meth:`linear`)."""
        rows_enough = x.shape[0] >= cpu_onednn.MIN_ROWS and x.dtype == torch.bfloat16
        return self.onednn and rows_enough and not (gelu and residual is not None)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x [M, K]`` in fp32, fp16 or bf16, in ``x``'s dtype."""
        return self.linear(x)

    def linear(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        gelu: bool = False,
        residual: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``gelu(x @ W.T + bias) + residual`` (each part optional) for ``x [M, K]``, with ``bias [N]``, ``residual
        [M, N]`` and the result in ``x``'s dtype (fp32, fp16 or bf16), computed in fp32 and rounded once; into ``out``
        when given. oneDNN computes it where :attr:`onednn` and ``x`` is bf16 of MIN_ROWS rows or more, unless both
        GELU and the residual are asked for (its fused epilogue takes one of them)."""
        n, k = self.weight.shape
        if x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu" or x.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"x ({x.dtype}, shape {tuple(x.shape)}, on {x.device}) does not match a CPU weight of shape {(n, k)}"
            )
        x = x.contiguous()
        m = x.shape[0]
        _check_epilogue(bias, residual, x.dtype, m, n)
        if out is not None and (out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(m, n)}")
        if self._for_onednn(x, gelu, residual):
            y = cpu_onednn.linear(x, self.weight, bias, gelu, residual)
            return y if out is None else out.copy_(y)
        if out is None:
            out = torch.empty(m, n, dtype=x.dtype)
        status = self.library.gpt2_cpu_gemm(
            self.kind,
            x.data_ptr(),
            self.weight.data_ptr(),
            self.packed,
            None if self.scales is None else self.scales.data_ptr(),
            out.data_ptr(),
            m,
            n,
            k,
            None if bias is None else bias.data_ptr(),
            None if residual is None else residual.data_ptr(),
            KINDS[x.dtype],
            int(gelu),
            torch.get_num_threads(),
        )
        if status != 0:
            raise ValueError(f"the CPU GEMM refused a weight of shape {(n, k)} and dtype {self.weight.dtype}")
        return out


def _pack(weight: torch.Tensor, lanes: int) -> torch.Tensor:
    """``weight [N, K]``'s elements in the packed order: each whole strip of ``lanes`` rows as ``[K][lanes]`` (a
    strip's values at one k side by side), then the rows past the last strip as they are."""
    n, k = weight.shape
    whole = n // lanes * lanes
    strips = weight[:whole].reshape(-1, lanes, k).transpose(1, 2)
    return torch.cat([strips.reshape(-1), weight[whole:].reshape(-1)]).view(n, k)


def _unpack(packed: torch.Tensor, lanes: int) -> torch.Tensor:
    """The row-major ``[N, K]`` weight that :func:`_pack` packed."""
    n, k = packed.shape
    whole = n // lanes * lanes
    flat = packed.reshape(-1)
    strips = flat[: whole * k].view(-1, k, lanes).transpose(1, 2).reshape(whole, k)
    return torch.cat([strips, flat[whole * k :].view(-1, k)])


def _check_epilogue(bias: torch.Tensor | None, residual: torch.Tensor | None, dtype: torch.dtype, m: int, n: int):
    """``bias [N]`` and ``residual [M, N]`` (either may be None): contiguous CPU tensors in the activations' dtype."""
    for name, t, shape in (("bias", bias, (n,)), ("residual", residual, (m, n))):
        if t is not None and (t.shape != shape or t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu"):
            raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor of shape {shape}")


def attention_supports(k_cache: torch.Tensor) -> bool:
    """Whether :func:`decode_attention` takes this cache: a contiguous CPU ``[num_blocks, block_size, H, D]`` in fp32,
    fp16 or bf16, D a multiple of 8 up to 256, and the library available."""
    return (
        k_cache.device.type == "cpu"
        and k_cache.dtype in FLOAT_DTYPES
        and k_cache.dim() == 4
        and k_cache.shape[-1] % HEAD_DIM_MULTIPLE == 0
        and k_cache.shape[-1] <= MAX_HEAD_DIM
        and k_cache.is_contiguous()
        and available()
    )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 ``[B, H, D]``: each sequence's query ``q[b]`` against its ``context_lens[b]`` cached tokens, read through
    ``block_tables[b]`` (int32) from the paged caches (:func:`attention_supports`); zeros for a sequence with none."""
    B, H, D = q.shape
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype or not v_cache.is_contiguous():
        raise ValueError("k_cache and v_cache must be contiguous tensors of one shape and dtype")
    if k_cache.shape[2:] != (H, D):
        raise ValueError(f"q of shape {tuple(q.shape)} does not match a cache of shape {tuple(k_cache.shape)}")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype != torch.int32 or t.shape[0] != B or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int32 tensor with a row per sequence")
    q = q.float().contiguous()
    if out is None:
        out = torch.empty(B, H, D)
    elif out.shape != (B, H, D) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 tensor of shape {(B, H, D)}")
    status = library().gpt2_cpu_decode_attention(
        KINDS[k_cache.dtype],
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        block_tables.shape[1],
        context_lens.data_ptr(),
        out.data_ptr(),
        B,
        H,
        D,
        k_cache.shape[1],
        k_cache.shape[0],
        scale,
        torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError(
            f"a context length or block id does not fit block_tables {tuple(block_tables.shape)} and a cache of "
            f"shape {tuple(k_cache.shape)}"
        )
    return out


def store_supports(k: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether :func:`store_kv` takes these rows and cache: CPU, one dtype, rows ``[T, H, D]`` whose ``[H, D]`` is
    contiguous (views of the fused QKV output are), a contiguous ``[num_blocks, block_size, H, D]`` cache, and the
    library available."""
    return (
        k.device.type == "cpu"
        and k_cache.device.type == "cpu"
        and k.dtype == k_cache.dtype
        and k.dim() == 3
        and k_cache.dim() == 4
        and k.shape[1:] == k_cache.shape[2:]
        and k.stride(2) == 1
        and k.stride(1) == k.shape[2]
        and k_cache.is_contiguous()
        and available()
    )


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Row ``t`` of ``k`` and ``v`` into slot ``slot_mapping[t]`` (int64; -1 skips it) of the caches, which must pass
    :func:`store_supports` with ``k``; ``v`` is laid out as ``k``."""
    if v.shape != k.shape or v.stride() != k.stride() or v_cache.shape != k_cache.shape or not v_cache.is_contiguous():
        raise ValueError("v and v_cache must be laid out as k and k_cache")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (k.shape[0],) or not slot_mapping.is_contiguous():
        raise ValueError(f"slot_mapping must be a contiguous int64 tensor of shape ({k.shape[0]},)")
    row = k.shape[1] * k.shape[2] * k.element_size()
    status = library().gpt2_cpu_store_kv(
        k.data_ptr(),
        v.data_ptr(),
        k.stride(0) * k.element_size(),
        row,
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.shape[0] * k_cache.shape[1],
        slot_mapping.data_ptr(),
        k.shape[0],
    )
    if status != 0:
        raise ValueError(f"slot_mapping has a slot past the caches' {k_cache.shape[0] * k_cache.shape[1]}")
