"""bench/harness.py on the CPU: a case is validated before it is timed, each provider on its own; rows round-trip."""

from __future__ import annotations

import math
import time

import pytest
import torch

from bench.harness import (
    GRAPH_BELOW_MS,
    OURS,
    Bench,
    Case,
    Setup,
    Timers,
    append_rows,
    csv_rows,
    environment,
    measure,
    read_rows,
    rel_err,
)
from bench.shapes import model_for


def dry_bench(**kw) -> Bench:
    return Bench(device=torch.device("cpu"), dry_run=True, **kw)


def matmul_case(bench: Bench, calls_of, **kw) -> Case:
    """A float16 matmul with providers built by ``calls_of(a, b)``, checked against the float32 product."""

    def setup() -> Setup:
        a, b = bench.randn(33, 40, dtype=torch.float16), bench.randn(40, 24, dtype=torch.float16)
        return Setup(calls_of(a, b), a.float() @ b.float())

    return Case("demo", "matmul 33x40x24", torch.float16, setup, flops=2.0 * 33 * 40 * 24, **kw)


def test_each_provider_is_validated_and_only_the_valid_ones_timed():
    bench = dry_bench()
    broken = lambda a, b: (a @ b) * 1.01  # 1% off: above fp16's 5e-3
    result = measure(bench, matmul_case(bench, lambda a, b: {
        OURS: lambda: a @ b,
        "torch": lambda: broken(a, b),
        "torch.compile": lambda: (_ for _ in ()).throw(RuntimeError("no kernel")),
        "nan": lambda: torch.full((33, 24), float("nan")),
    }))  # fmt: skip
    t = result.timings
    assert t[OURS].status == "OK" and t[OURS].ms > 0 and t[OURS].err < 5e-3
    assert t["torch"].status == "FAIL" and t["torch"].ms is None and math.isclose(t["torch"].err, 0.01, rel_tol=0.1)
    assert t["torch.compile"].status == "ERROR" and "no kernel" in t["torch.compile"].reason
    assert t["nan"].status == "FAIL" and t["nan"].ms is None  # NaN never passes
    assert result.method == "wallclock-interpreter"


def test_a_wrong_shape_fails_instead_of_broadcasting():
    bench = dry_bench()
    result = measure(bench, matmul_case(bench, lambda a, b: {OURS: lambda: (a @ b)[:1]}))
    assert result.timings[OURS].status == "ERROR" and "shape" in result.timings[OURS].reason


def test_a_failing_setup_and_a_spent_budget_are_recorded():
    bench = dry_bench()

    def setup():
        raise MemoryError("no room")

    result = measure(bench, Case("demo", "broken", torch.float16, setup))
    assert result.timings[OURS].status == "ERROR" and "no room" in result.timings[OURS].reason
    spent = dry_bench(deadline=0.0)
    result = measure(spent, matmul_case(spent, lambda a, b: {OURS: lambda: a @ b}))
    assert result.timings[OURS].status == "SKIP"


def test_providers_can_be_picked_and_peers_have_their_own_reference():
    bench = dry_bench(providers=(OURS,))
    result = measure(bench, matmul_case(bench, lambda a, b: {OURS: lambda: a @ b, "torch": lambda: a @ b}))
    assert list(result.timings) == [OURS]

    def setup() -> Setup:
        x = bench.randn(64, dtype=torch.float16)
        return Setup({OURS: lambda: x * 2, "torch": lambda: x}, x.float() * 2, references={"torch": x.float()})

    result = measure(dry_bench(), Case("demo", "scale", torch.float16, setup))
    assert all(t.status == "OK" for t in result.timings.values())


def test_copies_run_in_a_dry_run():
    """The GPU's graph timings cycle through copies: a dry run calls each provider once on a copy."""
    bench = dry_bench()
    used = []

    def setup() -> Setup:
        a = bench.randn(8, 8, dtype=torch.float16)

        def calls(a):
            return {OURS: lambda: (used.append(a), a * 1)[1]}

        return Setup(calls(a), a.float(), copies=lambda: calls(a.clone()), copy_bytes=a.nbytes)

    result = measure(bench, Case("demo", "copy", torch.float16, setup))
    assert result.timings[OURS].status == "OK"
    assert len({id(a) for a in used}) == 2  # the original operand and one copy


def graph_replays(ms: float):
    """A stand-in for ``do_bench_cudagraph``: runs the cycled call three times (over three copies), returns ``ms``."""

    def graph(fn) -> float:
        for _ in range(3):
            fn()
        return ms

    return graph


def gpu_bench(timers: Timers) -> Bench:
    """A bench that takes the GPU's timing path on the CPU, with ``timers`` standing in for triton.testing's."""
    return Bench(device=torch.device("cpu"), dry_run=False, timers=timers)


def rotating_case(bench: Bench, read: list | None = None) -> Case:
    """Two providers of ``a * 2`` over copies of ``a``; each call appends the copy it read to ``read``."""
    read = [] if read is None else read

    def setup() -> Setup:
        a = bench.randn(8, 8, dtype=torch.float16)

        def calls(a):
            return {OURS: lambda: (read.append(a), a * 2)[1], "triton-split": lambda: (read.append(a), a * 2)[1]}

        return Setup(calls(a), a.float() * 2, copies=lambda: calls(a.clone()), copy_bytes=100 << 20)

    return Case("demo", "rotate", torch.float16, setup)


def test_calls_short_on_the_device_are_graph_timed_however_long_their_host_time():
    """The first H200 run timed its split-K sweep (our launcher against itself) with do_bench at 100-250 us, the
    launcher's host time, for GEMVs of ~8 us on the device. The method follows the device time."""
    host_bound = Timers(device=lambda fn: 0.008, plain=lambda fn: 0.2, graph=graph_replays(0.0075))
    read = []
    result = measure(gpu_bench(host_bound), rotating_case(dry_bench(), read))
    assert result.method == "cudagraph, 3 operand copies"  # 256 MiB over 100 MiB copies
    assert all(t.status == "OK" and t.ms == 0.0075 for t in result.timings.values())
    replayed = read[2:]  # after the two validations: each provider's three replays
    assert len(replayed) == 6 and len({id(a) for a in replayed}) == 3  # each replay on its own copy

    device_bound = Timers(device=lambda fn: GRAPH_BELOW_MS, plain=lambda fn: 0.3, graph=graph_replays(0.0075))
    result = measure(gpu_bench(device_bound), rotating_case(dry_bench()))
    assert result.method == "do_bench"
    assert all(t.ms == 0.3 for t in result.timings.values())


def test_one_short_provider_sends_the_whole_case_to_graphs():
    """Ours and its peer are always timed the same way: one call under GRAPH_BELOW_MS on the device decides."""
    seen = []

    def device(fn) -> float:
        seen.append(fn)
        return 0.05 if len(seen) == 2 else 0.5

    result = measure(gpu_bench(Timers(device, lambda fn: 1.0, graph_replays(0.04))), rotating_case(dry_bench()))
    assert len(seen) == 2 and result.method.startswith("cudagraph")
    assert [t.ms for t in result.timings.values()] == [0.04, 0.04]


def test_a_provider_that_syncs_keeps_the_whole_case_out_of_graphs():
    """A call that reads a device value on the host can't be captured, and a capture it breaks part-way broke every
    later case on the first H200 run: such a case is timed plainly, all its providers alike, and never captured."""
    captured = []
    timers = Timers(
        device=lambda fn: 0.008,
        plain=lambda fn: 0.3,
        graph=lambda fn: captured.append(fn) or 0.0075,
        syncs=lambda fn: getattr(fn, "reads_the_device", False),
    )
    case = rotating_case(dry_bench())
    setup = case.setup

    def setup_with_a_syncing_peer() -> Setup:
        s = setup()
        peer = s.calls["triton-split"]

        def syncing_peer():
            return peer()

        syncing_peer.reads_the_device = True
        s.calls["triton-split"] = syncing_peer
        return s

    case.setup = setup_with_a_syncing_peer
    result = measure(gpu_bench(timers), case)
    assert result.method == "do_bench (triton-split syncs: no graph)"
    assert [t.ms for t in result.timings.values()] == [0.3, 0.3]
    assert captured == []


def test_operands_come_from_the_bench_generator_seeded_by_torch():
    """Draws from torch's default generator in between (a capture may break it on a GPU) change nothing, and
    ``torch.manual_seed`` still fixes a run's operands."""
    seed = int(torch.randint(2**31, ()))
    torch.manual_seed(seed)
    bench = dry_bench()
    torch.randn(100)
    a, p = bench.randn(16, dtype=torch.float32), bench.randperm(16)
    torch.manual_seed(seed)
    bench = dry_bench()
    assert torch.equal(bench.randn(16, dtype=torch.float32), a) and torch.equal(bench.randperm(16), p)
    assert not torch.equal(dry_bench().randn(16, dtype=torch.float32), a)  # a fresh bench draws fresh operands


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_host_syncs_finds_a_device_read():
    from bench.harness import host_syncs

    x = torch.randn(4096, device="cuda")
    assert host_syncs(lambda: bool(x.sum() > 0))
    assert not host_syncs(lambda: x * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times the GPU")
def test_device_ms_leaves_out_the_host_time_of_a_call():
    """A call that spends 0.5 ms on the host before its microsecond kernel: do_bench would time the host, device_ms
    times the kernel (the GPU spin queued ahead of it, 1-2 ms, covers the host's 0.5 ms)."""
    from bench.harness import device_ms

    x = torch.randn(4096, device="cuda")

    def slow_launch():
        time.sleep(0.0005)
        return x * 2

    assert device_ms(slow_launch) < 0.2


def test_split_k_sweep_is_timed_as_the_linear_section():
    """On a GPU the split-K sweep (our launcher with a forced depth against its own pick) and the linear section
    (ours, cuBLAS, torch.compile) time GEMVs short on the device the same way: graph replays over copies of the
    weight, whatever do_bench says (here: over GRAPH_BELOW_MS for every call, launch-bound, as on the H200)."""
    from bench.kernels import linear as linear_bench

    shapes = dry_bench()  # tiny GPT-2 shapes, on the CPU
    layer = model_for(dry_run=True).layer("mlp_out+res")
    timers = Timers(device=lambda fn: 0.008, plain=lambda fn: 2 * GRAPH_BELOW_MS, graph=graph_replays(0.0075))
    cases = [linear_bench.case(shapes, torch.float16, 1, layer)]
    cases += linear_bench.split_k_cases(shapes, torch.float16, [layer])
    assert [c.x for c in cases[1:]] == [2, 4]  # the depths that keep 64 of K = 256 per split, but the pick (1)
    for case in cases:
        result = measure(gpu_bench(timers), case)
        assert [t.status for t in result.timings.values()] == ["OK"] * len(result.timings), result.timings
        assert result.method == "cudagraph, 512 operand copies", case.name


def test_roofline_is_the_larger_floor():
    bench = dry_bench(copy_gbps=1000.0, matmul_tflops={"float16": 100.0})
    memory_bound = Case("demo", "m", torch.float16, lambda: None, flops=1e9, nbytes=1e9)  # 1 ms vs 0.01 ms
    compute_bound = Case("demo", "c", torch.float16, lambda: None, flops=1e12, nbytes=1e6)  # 0.001 ms vs 10 ms
    assert bench.roofline_ms(memory_bound) == pytest.approx(1.0)
    assert bench.roofline_ms(compute_bound) == pytest.approx(10.0)
    assert dry_bench().roofline_ms(memory_bound) is None  # no ceilings measured yet


def test_rows_round_trip_through_the_csv(tmp_path):
    bench = dry_bench(copy_gbps=10.0, matmul_tflops={"float16": 1.0})
    case = matmul_case(bench, lambda a, b: {OURS: lambda: a @ b, "torch": lambda: (a @ b) * 2})
    case.sweep, case.x, case.variant, case.params = "M", 33, "demo", {"m": 33}
    rows = csv_rows(bench, measure(bench, case), environment(dry_run=True))
    path = tmp_path / "rows.csv"
    append_rows(path, rows)
    append_rows(path, rows)  # appending: one header
    back = read_rows(path)
    assert len(back) == 4 and path.read_text().count("kernel,sweep") == 1
    ours, peer = back[0], back[1]
    assert ours["provider"] == OURS and ours["status"] == "OK" and ours["x"] == 33.0
    assert ours["tflops"] == pytest.approx(case.flops / ours["ms"] * 1e-9)
    assert ours["pct_roofline"] == pytest.approx(100 * ours["roofline_ms"] / ours["ms"])
    assert ours["triton_speedup"] == 1.0 and ours["commit"] and ours["gpu"].startswith("cpu-interpreter")
    assert peer["status"] == "FAIL" and peer["ms"] is None and peer["rel_err"] > 0.5
    assert '"m": 33' in ours["params"]


def test_rel_err_compares_tuples_elementwise():
    ref = (torch.ones(4), torch.ones(3))
    assert rel_err((torch.ones(4), torch.ones(3) * 1.5), ref) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="tuple"):
        rel_err(torch.ones(4), ref)
