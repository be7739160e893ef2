"""Ratio arithmetic: every row relative to the SGD row of the same model and batch size."""

from __future__ import annotations

import pytest

from precond.bench.ratios import attach_ratios, safe_div


def _row(method, b=32, interval=1, time_ms=10.0, peak_mb=100.0, status="ok", **kw):
    row = {
        "method": method,
        "model": "mlp512",
        "batch_size": b,
        "interval": interval,
        "device": "cpu",
        "status": status,
        "time_ms": time_ms if status == "ok" else None,
        "peak_mb": peak_mb if status == "ok" else None,
        "floor_costs_ms": {},
        "state_mb": 0.0,
        "transient_mb": 0.0,
    }
    row.update(kw)
    return row


def test_ratios_floor_and_efficiency():
    sgd = _row("plain", time_ms=10.0, peak_mb=100.0)
    m = _row(
        "kfac",
        interval=10,
        time_ms=25.0,
        peak_mb=130.0,
        floor_costs_ms={"extra_backward": 4.0, "curvature": 6.0, "refresh": 50.0, "apply": 2.0},
        state_mb=20.0,
        transient_mb=5.0,
    )
    attach_ratios([m, sgd])
    assert m["sgd_time_ms"] == 10.0
    assert m["time_ratio"] == pytest.approx(2.5)
    assert m["throughput_ratio"] == pytest.approx(0.4)
    assert m["floor_ms"] == pytest.approx(10.0 + 2.0 + (4.0 + 6.0 + 50.0) / 10)
    assert m["floor_phases_ms"]["refresh"] == pytest.approx(5.0)
    assert m["floor_throughput_ratio"] == pytest.approx(10.0 / 18.0)
    assert m["efficiency"] == pytest.approx(18.0 / 25.0)
    assert m["mem_ratio"] == pytest.approx(1.3)
    assert m["mem_floor_mb"] == pytest.approx(125.0)
    assert m["mem_floor_ratio"] == pytest.approx(1.25)
    assert m["mem_over_floor"] == pytest.approx(130.0 / 125.0)
    # The baseline is its own reference.
    assert sgd["throughput_ratio"] == 1.0 and sgd["efficiency"] == 1.0 and sgd["mem_ratio"] == 1.0


def test_reference_is_per_model_and_batch_size():
    rows = [
        _row("plain", b=32, time_ms=10.0),
        _row("plain", b=128, time_ms=40.0),
        _row("kfac", b=128, time_ms=80.0),
    ]
    attach_ratios(rows)
    assert rows[2]["sgd_time_ms"] == 40.0
    assert rows[2]["throughput_ratio"] == pytest.approx(0.5)


def test_failed_rows_and_missing_baseline_give_none():
    rows = [
        _row("plain", b=32, status="oom", reason="out of memory"),
        _row("kfac", b=32, time_ms=5.0),
        _row("plain", b=64),
        _row("kfac", b=64, status="timeout", reason="timed out after 1 s"),
    ]
    attach_ratios(rows)
    for r in rows[:2]:
        assert r["throughput_ratio"] is None and r["efficiency"] is None and r["mem_ratio"] is None
        assert r["floor_ms"] is None and r["mem_over_floor"] is None
    assert rows[3]["throughput_ratio"] is None and rows[3]["sgd_time_ms"] == 10.0


def test_safe_div():
    assert safe_div(1.0, 4.0) == 0.25
    assert safe_div(None, 4.0) is None
    assert safe_div(1.0, 0.0) is None
    assert safe_div(1.0, None) is None


def test_sgd_timed_in_the_methods_own_process_takes_precedence():
    rows = [_row("plain", time_ms=10.0), _row("kfac", time_ms=30.0, sgd_in_process_ms=12.0)]
    attach_ratios(rows)
    assert rows[1]["sgd_time_ms"] == 12.0
    assert rows[1]["throughput_ratio"] == pytest.approx(0.4)
    assert rows[1]["floor_ms"] == pytest.approx(12.0)
    assert rows[1]["mem_ratio"] == pytest.approx(1.0)  # memory still from the SGD row


def test_live_tensor_peaks_have_their_own_floor():
    sgd = _row("plain", peak_mb=100.0, live_peak_mb=40.0)
    m = _row("kfac", peak_mb=150.0, live_peak_mb=66.0, state_mb=20.0, transient_mb=5.0)
    old = _row("kfac", b=64, peak_mb=150.0)  # rows of a run without the live pass
    attach_ratios([sgd, m, old])
    assert m["sgd_live_peak_mb"] == 40.0
    assert m["live_floor_mb"] == pytest.approx(65.0)
    assert m["live_over_floor"] == pytest.approx(66.0 / 65.0)
    assert m["mem_over_floor"] == pytest.approx(150.0 / 125.0)
    assert old["live_floor_mb"] is None and old["live_over_floor"] is None


def test_headline_memory_is_live_where_measured_else_resident_set():
    sgd = _row("plain", peak_mb=100.0, live_peak_mb=40.0)
    m = _row("kfac", peak_mb=150.0, live_peak_mb=66.0, state_mb=20.0, transient_mb=5.0)
    old = _row("kfac", b=64, peak_mb=130.0)
    sgd64 = _row("plain", b=64, peak_mb=100.0)
    attach_ratios([sgd, m, old, sgd64])
    assert m["memory_measure"] == "live"
    assert m["peak_over_floor"] == pytest.approx(66.0 / 65.0)
    assert m["peak_ratio"] == pytest.approx(66.0 / 40.0)
    assert m["peak_floor_ratio"] == pytest.approx(65.0 / 40.0)
    assert old["memory_measure"] == "rss"
    assert old["peak_over_floor"] == pytest.approx(1.3)
    assert old["peak_ratio"] == pytest.approx(1.3)


def test_summary_counts_configurations_per_target():
    from precond.bench.report import render_markdown

    rows = [
        _row("plain", time_ms=10.0, peak_mb=100.0, live_peak_mb=40.0),
        _row("kfac", interval=1, time_ms=12.0, live_peak_mb=44.0, floor_costs_ms={"apply": 1.0}),
        _row("kfac", interval=10, time_ms=30.0, live_peak_mb=70.0),
    ]
    md = render_markdown(attach_ratios(rows))
    summary = md.split("## Summary")[1].split("##")[0]
    line = next(x for x in summary.splitlines() if x.startswith("| kfac"))
    # Efficiency 11/12 and 10/30: one of two meets 0.8; live peaks 44/40 and 70/40 over floor.
    assert "0.33 · 0.62" in line and "✗ 1/2" in line and "1.75 (mlp512 B=32 T=10)" in line
    assert "Methods meeting both targets in every configuration: 0 of 1." in summary


def test_header_names_the_allocator_settings_of_the_workers():
    from precond.bench.report import render_markdown

    rows = attach_ratios([_row("plain"), _row("kfac")])
    spec = {"methods": ["plain", "kfac"], "models": ["mlp512"], "batch_sizes": [32]}
    steady = {"MALLOC_TRIM_THRESHOLD_": "9", "MALLOC_MMAP_MAX_": "0"}
    md = render_markdown(rows, {"spec": {**spec, "malloc_env": steady}})
    assert "; C allocator: MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=9." in md
    assert "; C allocator:" not in render_markdown(rows, {"spec": spec})


def test_header_says_where_the_floor_kernels_were_timed():
    from precond.bench.report import render_markdown

    rows = attach_ratios([_row("plain"), _row("kfac")])
    spec = {"methods": ["plain", "kfac"], "models": ["mlp512"], "batch_sizes": [32]}
    own = render_markdown(rows, {"spec": {**spec, "share_kernel_timings": False}})
    assert "; floor kernels timed in every worker (a low quantile over the workers)" in own
    shared = render_markdown(
        rows, {"spec": {**spec, "share_kernel_timings": True, "cold_kernels": False}}
    )
    assert "; floor kernels timed once per run and shape; C" not in shared
    assert "; floor kernels timed once per run and shape" in shared
    cold = render_markdown(
        rows, {"spec": {**spec, "share_kernel_timings": False, "cold_kernels": True}}
    )
    assert "a low quantile over the workers), caches evicted before each run" in cold
    # Results written before the option existed say nothing about it.
    assert "floor kernels timed" not in render_markdown(rows, {"spec": spec})
