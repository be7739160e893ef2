"""Contention: other processes on the worker's cores are detected, flagged and re-measured."""

from __future__ import annotations

from precond.bench import runner
from precond.bench.contention import ContentionMeter, busy_cpu_seconds, is_contended
from precond.bench.report import render_markdown
from precond.bench.runner import BenchSpec, run_bench


def test_is_contended_compares_other_load_with_the_free_cores():
    assert not is_contended(None, 2, cpus=2)
    assert not is_contended(0.1, 2, cpus=2)
    assert is_contended(0.9, 2, cpus=2)
    assert not is_contended(0.9, 1, cpus=2)  # one core was free for the other process
    assert is_contended(1.5, 1, cpus=2)
    assert is_contended(0.5, 0, cpus=4)  # threads=0 uses every core


def test_meter_needs_a_long_enough_window():
    meter = ContentionMeter()
    meter.start()
    assert meter.stop() is None  # too short for /proc/stat's resolution
    if busy_cpu_seconds() is not None:
        assert busy_cpu_seconds() > 0


def test_contended_rows_are_measured_again_and_flagged(tmp_path):
    calls = []

    def worker(config, timeout):
        calls.append(config["method"])
        # plain: contended twice then clean; kfac: contended every time.
        other = 1.5 if (config["method"] == "kfac" or calls.count("plain") < 3) else 0.0
        return {
            **{k: config[k] for k in ("method", "model", "batch_size", "interval", "device")},
            "status": "ok",
            "time_ms": 10.0 + other,
            "peak_mb": 1.0,
            "other_cores": other,
        }

    spec = BenchSpec(["plain", "kfac"], ["mlp_tiny"], [8], [1], threads=2, retry_contended=2)
    rows = run_bench(spec, None, progress=False, worker=worker)
    assert calls == ["plain"] * 3 + ["kfac"] * 3
    assert rows[0]["attempts"] == 3 and not rows[0]["contended"]
    assert rows[1]["attempts"] == 3 and rows[1]["contended"]
    md = render_markdown(rows)
    assert "| kfac | 8 | 1 | 11.5 † |" in md
    assert "† 1 of 2 configurations were measured while other processes used" in md


def test_failed_rows_are_not_retried():
    calls = []

    def worker(config, timeout):
        calls.append(1)
        return runner._failed(config, "oom", "out of memory")

    spec = BenchSpec(["plain"], ["mlp_tiny"], [8], [1], retry_contended=3)
    rows = run_bench(spec, None, progress=False, worker=worker)
    assert len(calls) == 1 and rows[0]["status"] == "oom"
