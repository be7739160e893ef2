"""The floor model: known kernel times give the expected floor, per phase and amortised."""

from __future__ import annotations

import pytest
import torch

from precond.bench.floor import amortised_floor, memory_floor_mb, numel_mb, phase_costs
from precond.bench.kernels import KernelTimer, kernel_key, make_kernel
from precond.methods.cost import CostModel, KernelOp, Phase

# Known kernel times (ms) by kind.
KNOWN = {"bmm": 2.0, "cholesky": 5.0, "cholesky_inverse": 3.0, "elementwise": 0.5}


def _known(op: KernelOp) -> float:
    if op.kind not in KNOWN:
        raise ValueError(op.kind)
    return KNOWN[op.kind]


def _kfac_like() -> CostModel:
    cm = CostModel(state_numel=1000, transient_numel=24)
    cm.add(Phase.EXTRA_BACKWARD, "backward", (1,))
    cm.add(Phase.CURVATURE, "bmm", (1, 8, 32, 8))
    cm.add(Phase.CURVATURE, "bmm", (1, 4, 32, 4))
    cm.add(Phase.REFRESH, "cholesky", (1, 8), count=2)
    cm.add(Phase.REFRESH, "cholesky_inverse", (1, 8))
    cm.add(Phase.APPLY, "bmm", (1, 4, 4, 8))
    cm.add(Phase.APPLY, "elementwise", (100,), count=3)
    return cm


def test_phase_costs_sum_kernels_times_counts():
    costs = phase_costs(_kfac_like(), _known, backward_ms=7.0, hvp_ms=0.0, num_classes=10)
    assert costs.ms["extra_backward"] == pytest.approx(7.0)
    assert costs.ms["curvature"] == pytest.approx(4.0)
    assert costs.ms["refresh"] == pytest.approx(2 * 5.0 + 3.0)
    assert costs.ms["apply"] == pytest.approx(2.0 + 3 * 0.5)
    assert len(costs.kernels) == 7
    assert costs.unknown == []


def test_backward_count_minus_one_means_one_pass_per_class_and_hvp_uses_its_rate():
    cm = CostModel()
    cm.add(Phase.EXTRA_BACKWARD, "backward", (-1,))
    cm.add(Phase.EXTRA_BACKWARD, "hvp", (3,), count=2)
    costs = phase_costs(cm, _known, backward_ms=1.5, hvp_ms=4.0, num_classes=10)
    assert costs.ms["extra_backward"] == pytest.approx(10 * 1.5 + 3 * 2 * 4.0)


def test_forward_passes_use_the_measured_forward_rate():
    cm = CostModel()
    cm.add(Phase.EXTRA_BACKWARD, "forward", (1,))
    cm.add(Phase.EXTRA_BACKWARD, "backward", (1,))
    costs = phase_costs(cm, _known, backward_ms=1.5, hvp_ms=0.0, num_classes=10, forward_ms=2.5)
    assert costs.ms["extra_backward"] == pytest.approx(4.0) and costs.unknown == []


def test_timed_passes_measure_the_forward_when_asked():
    from precond.bench.measure import timed_passes

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x, t = torch.randn(5, 4), torch.randint(0, 3, (5,))
    loss = torch.nn.functional.cross_entropy
    cpu = torch.device("cpu")
    out = timed_passes(model, loss, x, t, cpu, vector_backward=False, hvp=False, forward=True)
    assert out["forward"] > 0
    assert "forward" not in timed_passes(model, loss, x, t, cpu, vector_backward=False, hvp=False)


def test_unknown_kernel_kinds_are_listed_and_left_out():
    cm = CostModel()
    cm.add(Phase.APPLY, "fft", (8,))
    cm.add(Phase.APPLY, "bmm", (1, 2, 2, 2))
    costs = phase_costs(cm, _known, backward_ms=1.0, hvp_ms=1.0, num_classes=2)
    assert costs.unknown == ["fft"]
    assert costs.ms["apply"] == pytest.approx(2.0)


@pytest.mark.parametrize("interval", [1, 10, 100])
def test_amortised_floor_divides_curvature_and_refresh_by_the_interval(interval):
    costs = {"extra_backward": 7.0, "curvature": 4.0, "refresh": 13.0, "apply": 3.5}
    floor = amortised_floor(20.0, costs, interval)
    assert floor["fb"] == 20.0
    assert floor["apply"] == 3.5
    assert floor["extra_backward"] == pytest.approx(7.0 / interval)
    assert floor["refresh"] == pytest.approx(13.0 / interval)
    assert floor["total"] == pytest.approx(20.0 + 3.5 + (7.0 + 4.0 + 13.0) / interval)


def test_amortised_floor_with_separate_refresh_interval_and_empty_cost_model():
    costs = {"curvature": 4.0, "refresh": 10.0}
    assert amortised_floor(1.0, costs, 2, 5)["total"] == pytest.approx(1.0 + 2.0 + 2.0)
    assert amortised_floor(3.0, {}, 10)["total"] == 3.0


def test_memory_floor_adds_state_and_transient_megabytes():
    assert numel_mb(1024 * 1024, torch.float32) == pytest.approx(4.0)
    assert numel_mb(1024 * 1024, torch.float64) == pytest.approx(8.0)
    assert memory_floor_mb(100.0, 4.0, 2.0) == pytest.approx(106.0)


def test_kernel_timer_caches_by_kind_shape_and_dtype():
    key = kernel_key("bmm", (1, 2, 3, 4), torch.float32)
    assert key == "bmm[1,2,3,4]:float32"
    timer = KernelTimer("cpu", cache={key: 0.25})
    op = KernelOp(Phase.APPLY, "bmm", (1, 2, 3, 4))
    assert timer.seconds(op) == 0.25  # served from the cache, not timed
    assert timer.new == {}
    op2 = KernelOp(Phase.APPLY, "elementwise", (1000,))
    t = timer.seconds(op2)
    assert t > 0 and timer.new == {kernel_key("elementwise", (1000,), torch.float32): t}
    assert timer.seconds(op2) == t


@pytest.mark.parametrize(
    ("kind", "shape"),
    [
        ("matmul", (3, 4, 5)),
        ("bmm", (2, 3, 4, 5)),
        ("cholesky", (2, 6)),
        ("cholesky_inverse", (2, 6)),
        ("eigh", (2, 6)),
        ("eigvalsh", (2, 6)),
        ("qr", (2, 6)),
        ("elementwise", (10,)),
        ("randn", (10,)),
    ],
)
def test_every_kernel_kind_runs(kind, shape):
    make_kernel(kind, shape, torch.float32, torch.device("cpu"))()


def test_every_known_kind_is_tested():
    from precond.bench.kernels import KNOWN_KINDS

    tested = {"matmul", "bmm", "cholesky", "cholesky_inverse", "eigh", "eigvalsh", "qr"}
    assert set(KNOWN_KINDS) == tested | {"elementwise", "randn"}


def test_kernel_errors_are_clear():
    with pytest.raises(ValueError, match=r"Invalid kernel kind: 'fft'\. Supported: "):
        make_kernel("fft", (3,), torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"Invalid shape: \(3, 4\)\. A 'matmul' kernel takes 3"):
        make_kernel("matmul", (3, 4), torch.float32, torch.device("cpu"))


def test_last_level_cache_size_is_read_from_sysfs(tmp_path):
    from precond.bench.kernels import last_level_cache_bytes

    for name, size in (("index0", "32K"), ("index2", "1024K"), ("index3", "32768K")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(size + "\n")
    assert last_level_cache_bytes("cpu", str(tmp_path)) == 32 << 20
    # Nothing readable: an assumed 32 MiB.
    assert last_level_cache_bytes("cpu", str(tmp_path / "missing")) == 32 << 20


def test_time_callable_flushes_before_every_timed_run_only():
    from precond.bench.kernels import time_callable

    log: list[str] = []
    time_callable(
        lambda: log.append("run"),
        torch.device("cpu"),
        min_time=100.0,
        min_reps=4,
        max_reps=4,
        flush=lambda: log.append("flush"),
    )
    # One warm-up run, then four runs each after its own flush.
    assert log == ["run"] + ["flush", "run"] * 4


def test_cold_kernel_timer_evicts_caches_and_caps_its_runs(monkeypatch):
    from precond.bench import kernels

    flushes = [0]
    runs: list[int] = []

    def fake_flusher(device):
        def flush():
            flushes[0] += 1

        return flush

    def fake_time(fn, device, *, min_time, max_reps, flush):
        runs.append(max_reps)
        flush()
        return 1e-3

    monkeypatch.setattr(kernels, "cache_flusher", fake_flusher)
    monkeypatch.setattr(kernels, "time_callable", fake_time)
    op = KernelOp(Phase.APPLY, "elementwise", (1000,))
    cold = KernelTimer("cpu", cold=True)
    assert cold.seconds(op) == 1e-3 and flushes == [1]
    assert runs == [KernelTimer.COLD_REPS]
    cold.release()
    warm = KernelTimer("cpu")  # warm by default
    with pytest.raises(TypeError):
        warm.seconds(op)  # warm: no flush to call


def test_cache_flusher_overwrites_twice_the_last_level_cache(monkeypatch):
    from precond.bench import kernels

    monkeypatch.setattr(kernels, "last_level_cache_bytes", lambda device: 1 << 20)
    flush = kernels.cache_flusher("cpu")
    cells = [c.cell_contents for c in flush.__closure__ or ()]
    buffer = next(c for c in cells if isinstance(c, torch.Tensor))
    assert buffer.numel() * buffer.element_size() == 2 << 20
    flush()


def _pool_row(apply_ms, refresh_ms, status="ok"):
    kernels = [
        {"phase": "apply", "kind": "bmm", "shape": [1], "count": 2, "ms": 2 * apply_ms, "key": "a"},
        # the same kernel again (another layer of the same shape): one sample per worker
        {"phase": "apply", "kind": "bmm", "shape": [1], "count": 1, "ms": apply_ms, "key": "a"},
        {
            "phase": "refresh",
            "kind": "eigh",
            "shape": [1],
            "count": 1,
            "ms": refresh_ms,
            "key": "r",
        },
        {"phase": "extra_backward", "kind": "backward", "shape": [1], "count": 1, "ms": 5.0},
    ]
    costs = {"apply": 3 * apply_ms, "refresh": refresh_ms, "extra_backward": 5.0}
    return {"status": status, "floor_kernels": kernels, "floor_costs_ms": costs}


def test_pooled_kernel_timings_are_a_low_quantile_over_workers_and_rewrite_the_floors():
    from precond.bench.floor import KERNEL_QUANTILE, pool_kernel_timings

    assert KERNEL_QUANTILE == 0.25
    rows = [_pool_row(1.0, 10.0), _pool_row(3.0, 12.0), _pool_row(1.2, 30.0)]
    rows.append(_pool_row(100.0, 100.0, status="timeout"))  # failed rows neither vote nor change
    pooled = pool_kernel_timings(rows)
    # the 25th percentile, interpolated: a quarter of the way from the first to the third
    assert pooled == {"a": pytest.approx(1.1), "r": pytest.approx(11.0)}
    for row, own in zip(rows[:3], (1.0, 3.0, 1.2)):
        assert row["floor_costs_ms"]["apply"] == pytest.approx(3 * 1.1)
        assert row["floor_costs_ms"]["refresh"] == pytest.approx(11.0)
        assert row["floor_costs_ms"]["extra_backward"] == 5.0  # passes measured on the model
        assert row["floor_kernels"][0]["ms"] == pytest.approx(2.2)
        assert row["floor_kernels"][0]["worker_ms"] == pytest.approx(2 * own)
    assert rows[3]["floor_costs_ms"]["apply"] == 300.0
    # Pooling again changes nothing (the workers' own timings are kept).
    assert pool_kernel_timings(rows) == pooled
    assert rows[1]["floor_costs_ms"]["apply"] == pytest.approx(3.3)
    # a slow stretch covering most workers does not set the reference
    slow = [_pool_row(1.0, 10.0), *(_pool_row(2.0, 20.0) for _ in range(3))]
    assert pool_kernel_timings(slow)["r"] == pytest.approx(17.5)  # the median: 20
    assert pool_kernel_timings([_pool_row(1.0, 10.0)])["r"] == pytest.approx(10.0)


def test_floor_kernel_entries_carry_their_cache_key():
    cost = CostModel()
    cost.add(Phase.APPLY, "bmm", (1, 2, 3, 4))
    costs = phase_costs(cost, _known, backward_ms=1.0, hvp_ms=1.0, num_classes=3)
    assert costs.kernels[0]["key"] == kernel_key("bmm", (1, 2, 3, 4), torch.float32)


def test_passes_through_the_model_are_never_pooled_as_kernels():
    from precond.bench.floor import pool_kernel_timings

    def row(hvp_ms):
        hvp = {"phase": "extra_backward", "kind": "hvp", "shape": [1], "count": 1, "ms": hvp_ms}
        return {
            "status": "ok",
            "floor_kernels": [hvp],
            "floor_costs_ms": {"extra_backward": hvp_ms},
        }

    # Two models' Hessian-vector products: measured on each model, never a shared kernel.
    rows = [row(1.6), row(100.0), row(120.0)]
    assert pool_kernel_timings(rows) == {}
    assert [r["floor_costs_ms"]["extra_backward"] for r in rows] == [1.6, 100.0, 120.0]
    # Rows pooled by the old rule (the pass keyed and pooled) get their own measurement back.
    bad = row(100.0)
    bad["floor_kernels"][0].update(key="hvp[1]:float32", worker_ms=1.6)
    pool_kernel_timings([bad])
    assert bad["floor_costs_ms"]["extra_backward"] == pytest.approx(1.6)
    assert bad["floor_kernels"][0] == {
        "phase": "extra_backward",
        "kind": "hvp",
        "shape": [1],
        "count": 1,
        "ms": 1.6,
    }


def test_passes_are_priced_at_their_median_per_model_and_batch_size():
    from precond.bench.floor import pool_kernel_timings

    def row(model, backward, vector):
        kernels = [
            # one extra back-propagation to the layer outputs, two gradients
            {"phase": "extra_backward", "kind": "backward", "shape": [1], "count": 1, "ms": vector},
            {"phase": "curvature", "kind": "grad", "shape": [2], "count": 1, "ms": 2 * backward},
        ]
        return {
            "status": "ok",
            "model": model,
            "batch_size": 32,
            "passes_ms": {"backward": backward, "vector_backward": vector},
            "floor_kernels": kernels,
            "floor_costs_ms": {"extra_backward": vector, "curvature": 2 * backward},
        }

    rows = [row("cnn", 8.0, 4.0), row("cnn", 14.0, 6.0), row("cnn", 9.0, 5.0), row("mlp", 1.0, 0.5)]
    pool_kernel_timings(rows)
    for r in rows[:3]:
        assert r["passes_ms"] == {"backward": 9.0, "vector_backward": 5.0}
        assert r["floor_costs_ms"] == {
            "extra_backward": pytest.approx(5.0),
            "curvature": pytest.approx(18.0),
        }
    assert rows[1]["worker_passes_ms"] == {"backward": 14.0, "vector_backward": 6.0}
    assert rows[3]["floor_costs_ms"] == {"extra_backward": 0.5, "curvature": 2.0}  # its own model
    pool_kernel_timings(rows)  # idempotent
    assert rows[1]["floor_costs_ms"]["curvature"] == pytest.approx(18.0)


def test_kernel_slowdown_is_amortised_like_the_floor_against_the_run_reference():
    from precond.bench.floor import kernel_slowdown, pool_kernel_timings, reference_kernel_ms

    rows = [_pool_row(1.0, 10.0), _pool_row(1.0, 12.0), _pool_row(1.0, 30.0)]
    rows.append(_pool_row(100.0, 100.0, status="timeout"))
    reference = reference_kernel_ms(rows)
    assert reference == {"a": pytest.approx(1.0), "r": pytest.approx(11.0)}
    assert rows[2]["floor_kernels"][2]["ms"] == 30.0  # nothing is rewritten
    # T = 1: apply 3 x 1 ms and refresh 30 ms against 3 + 11
    ratio, ref = kernel_slowdown(rows[2], reference)
    assert (ratio, ref) == (pytest.approx(33.0 / 14.0), pytest.approx(14.0))
    # T = 10: the refresh counts a tenth (the apply runs every step)
    ratio, ref = kernel_slowdown({**rows[2], "interval": 10}, reference)
    assert (ratio, ref) == (pytest.approx(6.0 / 4.1), pytest.approx(4.1))
    assert kernel_slowdown(rows[3], reference) is None  # failed rows
    assert kernel_slowdown(rows[0], {"other": 1.0}) is None  # no kernel with a reference
    # after pooling, the workers' own timings are still what is judged
    pool_kernel_timings(rows)
    assert kernel_slowdown(rows[2], reference)[0] == pytest.approx(33.0 / 14.0)
    assert reference_kernel_ms(rows) == reference


def test_the_first_pass_of_a_phase_costs_its_in_step_price():
    from precond.bench.floor import first_pass_name

    cm = CostModel()
    cm.add(Phase.EXTRA_BACKWARD, "hvp", (1,))
    cm.add(Phase.CURVATURE, "grad", (4,))
    cm.add(Phase.CURVATURE, "forward", (1,))
    first = {"hvp": 6.0, "grad": 0.5}  # the grad's in-step time below its rate: the rate
    costs = phase_costs(
        cm,
        _known,
        backward_ms=1.0,
        hvp_ms=4.0,
        num_classes=10,
        forward_ms=2.0,
        grad_ms=1.0,
        first_ms=first,
    )
    assert costs.ms["extra_backward"] == pytest.approx(6.0)
    assert costs.ms["curvature"] == pytest.approx(1.0 + 3 * 1.0 + 2.0)
    hvp, grad, fwd = costs.kernels
    assert hvp["pass_split_ms"] == {"first": 6.0, "more": 0.0}
    assert grad["pass_split_ms"] == {"first": 1.0, "more": 3.0}
    assert "pass_split_ms" not in fwd
    # which measured pass prices the first pass of each kind
    measured = dict.fromkeys(
        ("backward", "vector_backward", "grad_in_step", "vector_backward_in_step", "hvp_in_step"),
        1.0,
    )
    assert first_pass_name("backward", measured) == "vector_backward_in_step"
    assert first_pass_name("grad", measured) == "grad_in_step"
    assert first_pass_name("hvp", measured) == "hvp_in_step"
    assert first_pass_name("forward", measured) is None
    assert first_pass_name("backward", {"backward": 1.0, "grad_in_step": 1.0}) == "grad_in_step"
    assert first_pass_name("hvp", {"hvp": 1.0}) is None


def test_in_step_passes_are_pooled_like_the_others():
    from precond.bench.floor import pool_kernel_timings

    def row(first, rate):
        kernels = [
            {
                "phase": "curvature",
                "kind": "grad",
                "shape": [3],
                "count": 1,
                "ms": first + 2 * rate,
                "pass_split_ms": {"first": first, "more": 2 * rate},
            }
        ]
        return {
            "status": "ok",
            "model": "mlp",
            "batch_size": 32,
            "passes_ms": {"backward": rate, "grad_in_step": first},
            "floor_kernels": kernels,
            "floor_costs_ms": {"curvature": first + 2 * rate},
        }

    rows = [row(3.0, 1.0), row(5.0, 2.0), row(4.0, 3.0)]
    pool_kernel_timings(rows)
    for r in rows:  # the medians: 4.0 for the first pass, 2.0 for the further two
        assert r["floor_costs_ms"]["curvature"] == pytest.approx(4.0 + 2 * 2.0)
        assert r["floor_kernels"][0]["pass_split_ms"] == {"first": 4.0, "more": 4.0}
    pool_kernel_timings(rows)  # idempotent
    assert rows[0]["floor_costs_ms"]["curvature"] == pytest.approx(8.0)
    assert rows[0]["floor_kernels"][0]["pass_split_ms"] == {"first": 4.0, "more": 4.0}


def test_in_step_passes_time_what_a_pass_adds_to_a_step():
    from precond.bench.measure import in_step_passes, timed_passes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5))
    x, t = torch.randn(32, 64), torch.randint(0, 5, (32,))
    loss = torch.nn.functional.cross_entropy
    cpu = torch.device("cpu")
    names = {"grad_in_step", "vector_backward_in_step", "hvp_in_step"}
    out = in_step_passes(model, loss, x, t, cpu, names)
    assert set(out) == names
    assert all(v >= 0 for v in out.values())
    assert out["hvp_in_step"] > 0
    assert all(p.grad is None for p in model.parameters())  # nothing written into .grad
    with pytest.raises(ValueError, match="names"):
        in_step_passes(model, loss, x, t, cpu, {"jvp_in_step"})
    # only the passes a method's cost model prices are measured
    passes = timed_passes(
        model, loss, x, t, cpu, vector_backward=False, hvp=False, in_step={"backward"}
    )
    assert set(passes) == {"backward", "grad_in_step"}
    passes = timed_passes(
        model, loss, x, t, cpu, vector_backward=True, hvp=True, in_step={"backward", "hvp"}
    )
    assert {"vector_backward_in_step", "hvp_in_step"} <= set(passes)
    assert "grad_in_step" not in passes
