"""The hand-written CPU kernels (engine/csrc/ through engine.cpu_kernels): the GEMM exact against float64 for every
weight dtype and tile remainder, batch- and thread-invariant bit for bit; decode attention against the float64
reference through NaN-poisoned paged caches; the KV store; and a clean fall-back where the library can't build."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from engine import SamplingParams, cpu_kernels
from engine.torch_ops import TorchOps
from kernels.paged_attention import decode_attention_ref
from tests.helpers import rel_err
from tests.kernels.test_paged_attention import paged_cache

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL_DTYPES = FLOAT_DTYPES + [torch.int8]

needs_kernel = pytest.mark.skipif(
    not cpu_kernels.available(), reason="the CPU kernels need x86-64 with AVX2 and a C++ compiler"
)


@pytest.fixture(params=cpu_kernels.runnable_isas() or ("avx2",))
def isa(request, monkeypatch):
    """The library built for each instruction set this CPU runs: AVX2, and AVX-512 (16 lanes) where it has it."""
    monkeypatch.setenv(cpu_kernels.ISA_ENV, request.param)
    cpu_kernels.library.cache_clear()
    yield request.param
    monkeypatch.undo()
    cpu_kernels.library.cache_clear()


def random_weight(dtype: torch.dtype, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A weight in ``dtype`` and, for int8, its per-row scales."""
    if dtype != torch.int8:
        return (torch.randn(n, k) * 0.1).to(dtype), None
    return torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) * 0.01 + 1e-4


def run(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None, pack: bool = True) -> torch.Tensor:
    """Our kernel alone (a bf16 weight packed as asked, even where oneDNN would take it)."""
    out = torch.full((x.shape[0], w.shape[0]), float("nan"))  # poisoned: every element must be written
    cpu_kernels.GemmWeight(w, scales, pack, onednn=False).linear(x, out=out)
    return out


def int16_reference(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What the int8 kernel computes, in float64 from its own activation codes: each row of ``x`` rounded (half to
    even, in fp32 arithmetic as the kernel does it) to int16 codes at 32767 / max |row|."""
    most = x.abs().amax(dim=1, keepdim=True)
    codes = torch.round(x * (torch.tensor(32767.0) / most))
    x_scale = (most / torch.tensor(32767.0)).double()
    return (codes.double() @ w.double().t()) * x_scale * scales.double()


@needs_kernel
@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_matches_float64(dtype, pack, isa):
    """Every tile remainder: M around the 4-, 6- and 8-row blocks (and the 48- and 64-row sweeps of strips), N around
    the strips of 8 or 16 rows and their tiles of 2 or 3 (packed) or the groups of 3 and 6 rows (read in place), K
    long enough for the FMA chains' and int8's int32 chunks to roll over."""
    m = random.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 17, 47, 49, 65])
    n = random.randint(1, 120)
    k = 16 * random.randint(1, 40) if random.random() < 0.5 else 2048 + 16 * random.randint(1, 200)
    w, scales = random_weight(dtype, n, k)
    x = torch.randn(m, k)
    got = run(x, w, scales, pack)
    if dtype == torch.int8:
        assert rel_err(got, int16_reference(x, w, scales)) < 1e-6  # the sums are exact; only fp32 scaling rounds
        exact = x.double() @ (w.double() * scales.double()[:, None]).t()
        assert rel_err(got, exact) < 2e-4  # and the int16 codes are close to the activations
    else:
        assert rel_err(got, x.double() @ w.double().t()) < 1e-5  # fp32 sums of the dtype's own values


@needs_kernel
@pytest.mark.parametrize("act_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_fused_epilogue_matches_float64(dtype, act_dtype, isa):
    """gelu(x @ W.T + bias) + residual, each part on or off, activations in each float dtype; N not a multiple of 8
    half the time, so each thread's columns end in the scalar tail."""
    m, n, k = random.randint(1, 10), random.choice([8 * random.randint(1, 12), random.randint(1, 97)]), 64
    w, scales = random_weight(dtype, n, k)
    x = torch.randn(m, k).to(act_dtype)
    bias = torch.randn(n).to(act_dtype) if random.random() < 0.7 else None
    residual = torch.randn(m, n).to(act_dtype) if random.random() < 0.7 else None
    gelu = random.random() < 0.5
    out = torch.full((m, n), float("nan")).to(act_dtype)
    cpu_kernels.GemmWeight(w, scales).linear(x, bias, gelu, residual, out=out)
    ref = int16_reference(x.float(), w, scales) if dtype == torch.int8 else x.double() @ w.double().t()
    if bias is not None:
        ref = ref + bias.double()
    if gelu:
        ref = torch.nn.functional.gelu(ref, approximate="tanh")
    if residual is not None:
        ref = ref + residual.double()
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[act_dtype]  # one rounding to act_dtype
    assert rel_err(out, ref) < tol


@needs_kernel
@pytest.mark.parametrize("act_dtype", [torch.float16, torch.bfloat16])
def test_16bit_activations_round_once_as_torch_does(act_dtype, isa):
    """16-bit in and out: the fp32 result of the widened inputs, rounded to nearest even by ``.to()``, bit for bit."""
    w, _ = random_weight(torch.float16, random.randint(1, 40), 16 * random.randint(1, 8))
    m, n = random.randint(1, 9), w.shape[0]
    x, bias, residual = torch.randn(m, w.shape[1]).to(act_dtype), torch.randn(n), torch.randn(m, n)
    bias, residual = bias.to(act_dtype), residual.to(act_dtype)
    weight = cpu_kernels.GemmWeight(w)
    got = weight.linear(x, bias, True, residual)
    wide = weight.linear(x.float(), bias.float(), True, residual.float())
    assert got.dtype == act_dtype and torch.equal(got, wide.to(act_dtype))


@needs_kernel
def test_gelu_on_extreme_values():
    """GELU's vector path (8 columns at a time) against float64 far into both tails and near 0."""
    x = torch.cat([torch.linspace(-30, 30, 8 * 50), torch.randn(8 * 50) * 1e-3]).view(1, -1)
    w = torch.eye(x.shape[1])  # x @ I = x, so out = gelu(x)
    out = cpu_kernels.GemmWeight(w).linear(x, gelu=True)
    ref = torch.nn.functional.gelu(x.double(), approximate="tanh")
    assert (out.double() - ref).abs().max() < 1e-6 * (1 + ref.abs().max())


@needs_kernel
def test_epilogue_bad_arguments():
    weight = cpu_kernels.GemmWeight(torch.randn(8, 32))
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="bias must be"):
        weight.linear(x, bias=torch.randn(9))
    with pytest.raises(ValueError, match="residual must be"):
        weight.linear(x, residual=torch.randn(8, 2).t())  # not contiguous
    with pytest.raises(ValueError, match="bias must be"):
        weight.linear(x, bias=torch.randn(8).half())  # not x's dtype
    with pytest.raises(ValueError, match="does not match"):
        weight.linear(x.double())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_weights_past_a_chunk_of_strips(dtype, isa):
    """K of 4-6K makes a thread's chunk of strips (about 1 MiB of weights) a single tile of strips, so N of 7-12
    strips plus a tail of rows spans several chunks and both threads; M of 50-100 rows spans the sweeps of rows:
    against float64, and a row alone against the batch."""
    k = 16 * random.randint(260, 400)
    w, _ = random_weight(dtype, 16 * random.randint(7, 12) + random.randint(0, 15), k)
    x = torch.randn(random.randint(50, 100), k)
    batch = run(x, w, None)
    assert rel_err(batch, x.double() @ w.double().t()) < 1e-5
    i = random.randrange(x.shape[0])
    assert torch.equal(run(x[i : i + 1], w, None), batch[i : i + 1])


@needs_kernel
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_packing_keeps_the_weight_and_each_layout_is_batch_invariant(dtype, isa):
    """Packed weights go in strips of ``lanes`` rows, each output one FMA chain along k; row-major ones keep partial
    sums in the lanes: other bits (both within rounding of float64, see test_matches_float64), each layout's rows
    the same alone and in a batch. ``dense`` gives the weight back as it came."""
    w, _ = random_weight(dtype, random.randint(1, 40), 16 * random.randint(1, 16))
    x = torch.randn(random.randint(2, 9), w.shape[1])
    packed = cpu_kernels.GemmWeight(w, onednn=False)
    assert packed.packed
    assert not torch.equal(packed.weight, w) or w.shape[0] < packed.lanes  # rearranged, unless no strip is whole
    assert torch.equal(packed.dense(dtype), w)
    for pack in (True, False):
        batch = run(x, w, None, pack=pack)
        i = random.randrange(x.shape[0])
        assert torch.equal(run(x[i : i + 1], w, None, pack=pack), batch[i : i + 1])


@needs_kernel
@pytest.mark.skipif(len(cpu_kernels.runnable_isas()) < 2, reason="compares the AVX2 and AVX-512 builds")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_packed_weights_give_the_same_bits_in_every_build(dtype, monkeypatch):
    """A packed output's FMA chain does not depend on the vector width: where every row is in a whole strip (N a
    multiple of 16), the AVX2 and AVX-512 builds agree bit for bit."""
    w, _ = random_weight(dtype, 16 * random.randint(1, 4), 16 * random.randint(1, 40))
    x = torch.randn(random.randint(1, 20), w.shape[1])
    outs = []
    for isa in cpu_kernels.runnable_isas():
        monkeypatch.setenv(cpu_kernels.ISA_ENV, isa)
        cpu_kernels.library.cache_clear()
        outs.append(run(x, w, None))
    cpu_kernels.library.cache_clear()
    assert all(torch.equal(out, outs[0]) for out in outs[1:])


@needs_kernel
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_a_row_gets_the_same_bits_alone_and_in_any_batch(dtype, isa):
    k = 16 * random.randint(1, 64)
    w, scales = random_weight(dtype, random.randint(1, 50), k)
    x = torch.randn(random.randint(3, 19), k)
    batch = run(x, w, scales)
    for i in random.sample(range(x.shape[0]), 3):
        assert torch.equal(run(x[i : i + 1], w, scales), batch[i : i + 1])
        assert torch.equal(run(x[i:], w, scales), batch[i:])


@needs_kernel
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_rows_past_one_panel_of_activations(dtype, isa):
    """K = 2^16 makes a panel (half of L2 in activations or their int16 codes) a few rows at most (4, int8: 8), so
    M = 9 .. 17 spans several, the last maybe a single row: each row still matches float64 (int8: its own codes) and
    its own result alone."""
    k = 1 << 16
    w, scales = random_weight(dtype, random.randint(6, 20), k)
    x = torch.randn(random.randint(9, 17), k)
    batch = run(x, w, scales)
    ref = int16_reference(x, w, scales) if dtype == torch.int8 else x.double() @ w.double().t()
    assert rel_err(batch, ref) < 1e-5
    last = x.shape[0] - 1
    assert torch.equal(run(x[last:], w, scales), batch[last:])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_thread_count_does_not_change_the_bits(dtype, isa):
    k = 16 * random.randint(1, 64)
    w, scales = random_weight(dtype, random.randint(20, 90), k)
    x = torch.randn(random.randint(1, 9), k)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(x, w, scales)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(run(x, w, scales), one)


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_int8_nonfinite_activations_poison_only_their_row(bad):
    k = 16 * random.randint(1, 32)
    w, scales = random_weight(torch.int8, 24, k)
    x = torch.randn(5, k)
    row = random.randrange(5)
    x[row, random.randrange(k)] = bad
    got = run(x, w, scales)
    assert got[row].isnan().all()
    others = [i for i in range(5) if i != row]
    assert torch.equal(got[others], run(x[others], w, scales))


@needs_kernel
def test_int8_sums_never_overflow():
    """The largest codes everywhere (+-32767 against +-127) over a K of 2^14: 4x past int32 in one lane's sum, so
    the kernel must move its int32 sums to fp32 chunk by chunk."""
    k = 16384
    sign = random.choice([1, -1])
    w = torch.full((4, k), 127 * sign, dtype=torch.int8)
    scales = torch.rand(4) + 0.5
    x = torch.rand(2, 1) + 0.5 + torch.zeros(2, k)  # every activation its row's max
    assert rel_err(run(x, w, scales), x.double() @ (w.double() * scales.double()[:, None]).t()) < 1e-6


@needs_kernel
def test_int8_zero_row_gives_zeros():
    w, scales = random_weight(torch.int8, 12, 64)
    x = torch.randn(3, 64)
    x[1] = 0.0
    got = run(x, w, scales)
    assert torch.equal(got[1], torch.zeros(12))
    assert got[[0, 2]].abs().min() > 0


@needs_kernel
def test_bad_arguments():
    w, scales = random_weight(torch.int8, 8, 32)
    with pytest.raises(ValueError, match="does not match"):
        cpu_kernels.GemmWeight(w, scales).linear(torch.randn(2, 48))
    with pytest.raises(ValueError, match="scales go with int8"):
        cpu_kernels.GemmWeight(w)
    with pytest.raises(ValueError, match="scales go with int8"):
        cpu_kernels.GemmWeight(torch.randn(8, 32), scales)
    with pytest.raises(ValueError, match="scales must be"):
        cpu_kernels.GemmWeight(w, scales.double())
    with pytest.raises(ValueError, match="out must be"):
        cpu_kernels.GemmWeight(w, scales).linear(torch.randn(2, 32), out=torch.empty(2, 9))
    assert not cpu_kernels.gemm_supports(torch.randn(8, 40))  # K not a multiple of 16
    assert not cpu_kernels.gemm_supports(torch.randn(8, 32, dtype=torch.float64))


def cpu_paged_cache(lens: list[int], heads: int, head_dim: int, block_size: int, dtype: torch.dtype):
    """``tests.kernels``' NaN-poisoned paged cache (shuffled blocks, spare table columns), on the CPU."""
    return tuple(t.cpu() for t in paged_cache(lens, heads, head_dim, block_size, dtype))


@needs_kernel
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_decode_attention_matches_float64(dtype, isa):
    heads, head_dim = random.randint(1, 5), 8 * random.randint(1, 32)
    block_size = random.choice([1, 3, 16])
    lens = [random.randint(1, 70) for _ in range(random.randint(1, 6))]
    k_cache, v_cache, block_tables, context_lens = cpu_paged_cache(lens, heads, head_dim, block_size, dtype)
    q = torch.randn(len(lens), heads, head_dim)
    scale = head_dim**-0.5
    out = torch.full(q.shape, float("nan"))
    cpu_kernels.decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, out)
    ref = decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
    for b in range(len(lens)):
        assert rel_err(out[b], ref[b]) < 1e-5


@needs_kernel
def test_decode_attention_of_an_empty_context_is_zero():
    lens = [random.randint(1, 20), 0, random.randint(1, 20)]
    k_cache, v_cache, block_tables, context_lens = cpu_paged_cache(lens, 2, 16, 4, torch.float32)
    q = torch.randn(3, 2, 16)
    out = cpu_kernels.decode_attention(q, k_cache, v_cache, block_tables, context_lens, 0.25)
    assert torch.equal(out[1], torch.zeros(2, 16))
    assert out[[0, 2]].isfinite().all()


@needs_kernel
def test_decode_attention_bad_arguments():
    k_cache, v_cache, block_tables, lens = cpu_paged_cache([5, 7], 2, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="does not match"):
        cpu_kernels.decode_attention(torch.randn(2, 3, 16), k_cache, v_cache, block_tables, lens, 0.25)
    with pytest.raises(ValueError, match="block_tables must be"):
        cpu_kernels.decode_attention(torch.randn(2, 2, 16), k_cache, v_cache, block_tables.long(), lens, 0.25)
    with pytest.raises(ValueError, match="one shape and dtype"):
        cpu_kernels.decode_attention(torch.randn(2, 2, 16), k_cache, v_cache.half(), block_tables, lens, 0.25)
    with pytest.raises(ValueError, match="does not fit"):  # a context longer than its table row
        cpu_kernels.decode_attention(torch.randn(2, 2, 16), k_cache, v_cache, block_tables, lens + 64, 0.25)
    bad_tables = block_tables.clone()
    bad_tables[1, 0] = k_cache.shape[0]  # a block the cache does not have
    with pytest.raises(ValueError, match="does not fit"):
        cpu_kernels.decode_attention(torch.randn(2, 2, 16), k_cache, v_cache, bad_tables, lens, 0.25)
    assert not cpu_kernels.attention_supports(torch.zeros(4, 4, 2, 12))  # D not a multiple of 8


@needs_kernel
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_store_kv_writes_each_row_to_its_slot_and_nothing_else(dtype):
    T, H, D, block_size, num_blocks = random.randint(1, 9), random.randint(1, 4), 8 * random.randint(1, 8), 4, 5
    qkv = torch.randn(T, 3, H, D).to(dtype)  # k and v as the model passes them: strided views of the fused output
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * block_size)[:T]
    slots[torch.rand(T) < 0.3] = -1  # skipped rows
    k_cache, v_cache = (torch.full((num_blocks, block_size, H, D), float("nan")).to(dtype) for _ in range(2))
    assert cpu_kernels.store_supports(k, k_cache)
    cpu_kernels.store_kv(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, H, D), v_cache.view(-1, H, D)
    kept = slots >= 0
    assert torch.equal(flat_k[slots[kept]], k[kept]) and torch.equal(flat_v[slots[kept]], v[kept])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[kept]] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


@needs_kernel
def test_store_kv_refuses_a_slot_past_the_cache_and_writes_nothing():
    k_cache, v_cache = torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="past the caches"):
        cpu_kernels.store_kv(k, v, k_cache, v_cache, torch.tensor([0, 1, 8]))
    assert not k_cache.any() and not v_cache.any()
    with pytest.raises(ValueError, match="slot_mapping must be"):
        cpu_kernels.store_kv(k, v, k_cache, v_cache, torch.tensor([0, 1, 2], dtype=torch.int32))
    assert not cpu_kernels.store_supports(k.half(), k_cache)  # dtypes differ


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """``cpu_kernels.library()`` rebuilt from scratch into an empty cache, and reloaded normally afterwards."""
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path))
    cpu_kernels.library.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    cpu_kernels.library.cache_clear()


@needs_kernel
def test_the_best_instruction_set_unless_the_environment_asks_for_another(monkeypatch):
    best = "avx512" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "avx2"
    assert cpu_kernels.chosen_isa() == cpu_kernels.runnable_isas()[-1] == best
    assert cpu_kernels.library().isa == best
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "avx2")
    assert cpu_kernels.chosen_isa() == "avx2"
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "sse2")
    with pytest.raises(ValueError, match="GPT2_TRITON_CPU_ISA='sse2'"):
        cpu_kernels.chosen_isa()


@needs_kernel
def test_a_weight_keeps_the_build_it_was_packed_for(isa, monkeypatch):
    """A weight packed for one build's vector width is computed by that build even after the environment chose
    another."""
    w = torch.randn(random.randint(6, 40), 16 * random.randint(2, 8))
    x = torch.randn(random.randint(1, 9), w.shape[1])
    weight = cpu_kernels.GemmWeight(w)
    assert weight.lanes == (16 if isa == "avx512" else 8)
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "avx2" if isa == "avx512" else cpu_kernels.runnable_isas()[-1])
    cpu_kernels.library.cache_clear()
    assert rel_err(weight.linear(x), x.double() @ w.double().t()) < 1e-5


@needs_kernel
def test_builds_once_into_the_cache(fresh_library, monkeypatch):
    assert cpu_kernels.available()
    (built,) = fresh_library.glob("cpu_kernels-*.so")
    cpu_kernels.library.cache_clear()

    def no_build(*args):
        raise AssertionError("rebuilt a library the cache holds")

    monkeypatch.setattr(cpu_kernels, "build", no_build)
    assert cpu_kernels.available()
    assert list(fresh_library.glob("*")) == [built]  # and no temporary file left beside it


def test_a_failed_build_warns_and_pytorch_runs_the_linears(fresh_library, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    monkeypatch.setattr(cpu_kernels, "runnable_isas", lambda: ("avx2",))
    with pytest.warns(UserWarning, match="CPU kernels are not used"):
        assert not cpu_kernels.available()
    assert list(fresh_library.glob("*")) == []  # nothing half-written left in the cache
    w = torch.randn(64, 128)
    prepared = TorchOps().prepare_weight(w)
    assert not isinstance(prepared, cpu_kernels.GemmWeight)
    x = torch.randn(3, 128)
    assert rel_err(TorchOps().linear(x, prepared), x.double() @ w.double().t()) < 1e-5


def test_switched_off_by_the_environment(fresh_library, monkeypatch):
    monkeypatch.setenv(cpu_kernels.SWITCH_ENV, "0")
    assert not cpu_kernels.available()
    assert not isinstance(TorchOps().prepare_weight(torch.randn(32, 64)), cpu_kernels.GemmWeight)


@needs_kernel
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_a_model_gives_the_logits_of_pytorchs_paths(tiny_checkpoint, fresh_library, monkeypatch, dtype, tol):
    """The whole model on the kernels (GEMM, attention, store) against the same model on PyTorch's ops alone: a
    prefill's logits, and in fp32 the greedy tokens and log-probs of a few decode steps."""
    from engine import LLM

    ids = torch.randint(0, 50257, (random.randint(5, 40),)).tolist()
    prompts = [torch.randint(0, 50257, (random.randint(2, 12),)).tolist() for _ in range(3)]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0)
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv(cpu_kernels.SWITCH_ENV, switch)
        cpu_kernels.library.cache_clear()
        llm = LLM(str(tiny_checkpoint), backend="torch", device="cpu", dtype=dtype, progress=False)
        assert isinstance(llm.model.lm_head, cpu_kernels.GemmWeight) == (switch == "1")
        if switch == "1":  # the tied head reads the embedding's storage in place; the blocks' weights are packed
            assert llm.model.lm_head.weight.data_ptr() == llm.model.w.wte.data_ptr()
            block = llm.model.w.layers[0].attn_weight
            assert block.packed != block.onednn  # unless oneDNN's GEMM takes bf16 here, which reads them row-major
        decoded = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        steps = [(out.token_ids, [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]) for out in decoded]
        results.append((llm.model.logits(llm.features(ids)[0]), steps))
    (ours, our_steps), (theirs, their_steps) = results
    assert rel_err(ours, theirs) < tol
    if dtype == "float32":  # bf16 may break a near-tie the other way, and then the sequences part
        for (our_tokens, our_lp), (their_tokens, their_lp) in zip(our_steps, their_steps):
            assert our_tokens == their_tokens
            assert rel_err(torch.tensor(our_lp), torch.tensor(their_lp)) < tol


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_torch_compile_traces_the_pytorch_path(dtype):
    """Inside a graph torch.compile traces, TorchOps leaves the ctypes kernels out (dynamo can't trace them) and
    computes the same linear, attention and store with torch ops."""
    ops = TorchOps()
    w, scales = random_weight(dtype, 24, 32)
    weight = cpu_kernels.GemmWeight(w, scales)
    x, bias, residual = torch.randn(3, 32), torch.randn(24), torch.randn(3, 24)
    qkv = torch.randn(2, 3, 2, 16)
    lens = [random.randint(1, 9), random.randint(1, 9)]
    k_cache, v_cache, tables, context_lens = cpu_paged_cache(lens, 2, 16, 4, torch.float32)
    slots = torch.tensor([tables[0, -1].item() * 4, -1])  # a slot in a block no sequence owns, and a skip

    def step(x, k_cache, v_cache):
        y = ops.linear(x, weight, bias, activation="gelu_tanh", residual=residual)
        ops.store_kv(qkv[:, 1], qkv[:, 2], k_cache, v_cache, slots)
        return y, ops.decode_attention(qkv[:, 0], k_cache, v_cache, tables, context_lens, max(lens), 0.25)

    eager = step(x, k_cache.clone(), v_cache.clone())
    traced = torch.compile(step, backend="eager", fullgraph=True)(x, k_cache.clone(), v_cache.clone())
    for a, b in zip(eager, traced):
        assert rel_err(b, a) < (1e-5 if dtype == torch.float32 else 2e-4)  # int8: the kernel's int16 activation codes


@needs_kernel
@pytest.mark.parametrize("isa", sorted(cpu_kernels.ISA_FLAGS))
def test_source_compiles_without_warnings(tmp_path, isa):
    """For every instruction set, whether or not this CPU runs it: compiling needs only the compiler."""
    cxx = cpu_kernels.compiler()
    flags = [*cpu_kernels.flags(isa), "-Wall", "-Wextra", "-Werror"]
    r = subprocess.run(
        [cxx, *flags, *map(str, cpu_kernels.SOURCES), "-o", str(tmp_path / "k.so")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


@needs_kernel
def test_runs_on_pytorchs_openmp_runtime():
    """The library's libgomp is the one torch loaded: one OpenMP thread pool in the process, not two."""
    code = (
        "import torch; from engine import cpu_kernels; assert cpu_kernels.available()\n"
        "maps = open('/proc/self/maps').read().splitlines()\n"
        "print(len({line.split()[-1] for line in maps if 'libgomp' in line}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"
