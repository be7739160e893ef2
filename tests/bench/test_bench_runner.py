"""The grid runner: configurations, failure rows (never a crash), outputs."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from precond.bench import runner, worker
from precond.bench.ratios import attach_ratios
from precond.bench.report import render_markdown
from precond.bench.runner import BenchSpec, configurations, run_bench, run_worker


def test_configurations_put_the_baseline_first_once_per_model_and_batch():
    spec = BenchSpec(["kfac"], ["mlp_tiny", "cnn_small"], [8, 32], [1, 10])
    configs = configurations(spec)
    keys = [(c["model"], c["batch_size"], c["method"], c["interval"]) for c in configs]
    assert keys[:5] == [
        ("mlp_tiny", 8, "plain", 1),
        ("mlp_tiny", 8, "kfac", 1),
        ("mlp_tiny", 8, "kfac", 10),
        ("mlp_tiny", 32, "plain", 1),
        ("mlp_tiny", 32, "kfac", 1),
    ]
    assert len(configs) == 2 * 2 * (1 + 2)


def test_spec_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"Invalid method: 'nope'"):
        BenchSpec(["nope"], ["mlp_tiny"], [8], [1])
    with pytest.raises(ValueError, match=r"Invalid model: 'nope'\. Known: \("):
        BenchSpec(["plain"], ["nope"], [8], [1])


def test_timeout_becomes_a_row(monkeypatch, tiny_config):
    monkeypatch.setattr(runner, "WORKER_ARGS", ["-c", "import time; time.sleep(30)"])
    row = run_worker(tiny_config, timeout=0.5)
    assert row["status"] == "timeout"
    assert row["reason"] == "timed out after 0.5 s"
    assert row["method"] == "plain" and row["batch_size"] == 4


def test_killed_worker_becomes_a_row(monkeypatch, tiny_config):
    monkeypatch.setattr(
        runner, "WORKER_ARGS", ["-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    )
    row = run_worker(tiny_config, timeout=30)
    assert row["status"] == "crashed"
    assert row["reason"] == "worker killed by SIGKILL (out of memory?)"
    assert runner._signal_reason(-signal.SIGSEGV) == "worker killed by SIGSEGV"


def test_failing_worker_becomes_a_row(monkeypatch, tiny_config):
    monkeypatch.setattr(
        runner, "WORKER_ARGS", ["-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]
    )
    row = run_worker(tiny_config, timeout=30)
    assert row["status"] == "crashed"
    assert row["reason"] == "worker failed: boom"
    assert "boom" in row["stderr_tail"]


def test_errors_inside_the_measurement_become_rows(monkeypatch, tiny_config):
    row = worker.run_config({**tiny_config, "model": "nope"})
    assert row["status"] == "error"
    assert row["reason"].startswith("ValueError: Invalid model: 'nope'")

    def oom(spec):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(worker, "_measure", oom)
    row = worker.run_config(dict(tiny_config))
    assert row["status"] == "oom"
    assert "out of memory" in row["reason"]


def _fake_worker(config, timeout):
    if config["method"] == "kfac" and config["interval"] == 10:
        return runner._failed(config, "timeout", f"timed out after {timeout:g} s")
    slow = 1.0 if config["method"] == "plain" else 2.0
    return {
        **{
            k: config[k] for k in ("method", "model", "batch_size", "interval", "device", "threads")
        },
        "status": "ok",
        "reason": None,
        "time_ms": slow * config["batch_size"],
        "peak_mb": 10.0 * slow,
        "phases_ms": {
            "fb": 1.0,
            "extra_backward": 0.0,
            "curvature": 0.0,
            "refresh": 0.0,
            "apply": 0.0,
        },
        "floor_costs_ms": {"apply": 0.5 * config["batch_size"]}
        if config["method"] != "plain"
        else {},
        "state_mb": 2.0,
        "transient_mb": 0.0,
        "kernel_cache_new": {f"k{len(config['kernel_cache'])}": 1.0},
    }


def test_run_bench_writes_rows_report_and_figures(tmp_path):
    spec = BenchSpec(["plain", "kfac"], ["mlp_tiny"], [8, 32], [1, 10], timeout=7)
    rows = run_bench(spec, tmp_path, progress=False, argv=["precond", "bench"], worker=_fake_worker)
    assert len(rows) == 6
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["method"] for line in lines] == [r["method"] for r in rows]
    first = json.loads(lines[1])
    assert first["env"]["command"] == "precond bench"
    assert {"torch", "device", "threads", "git_commit", "cpu", "date"} <= set(first["env"])
    assert first["throughput_ratio"] == pytest.approx(0.5)
    assert first["efficiency"] == pytest.approx((8 + 4) / 16)
    assert "kernel_cache_new" not in first
    md = (tmp_path / "results.md").read_text()
    assert "| kfac | 8 | 10 | timeout: timed out after 7 s |" in md
    assert "## Missing points" in md
    assert (tmp_path / "poster.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "results.partial.jsonl").exists()


def test_report_flags_efficiencies_above_one():
    from precond.bench.report import render_markdown

    row = {"method": "kfac", "model": "mlp_tiny", "batch_size": 8, "interval": 1, "status": "ok",
           "time_ms": 1.0, "efficiency": 1.4}  # fmt: skip
    assert "1 configurations have an efficiency above 1.1" in render_markdown([row])
    assert "above 1.1" not in render_markdown([{**row, "efficiency": 1.05}])


def test_a_diverged_model_is_detected_after_timing():
    model = torch.nn.Linear(3, 2)
    assert not worker._diverged(model, [torch.tensor(1.0)])
    assert worker._diverged(model, [torch.tensor(float("nan"))])
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    assert worker._diverged(model, [])


def test_diverged_rows_and_method_options_are_shown_in_the_report():
    base = {"model": "mlp_tiny", "batch_size": 8, "interval": 1, "status": "ok", "time_ms": 2.0}
    rows = [
        {**base, "method": "plain"},
        {**base, "method": "seng", "diverged": True, "options": {"damping": 0.1}},
    ]
    attach_ratios(rows)
    md = render_markdown(rows)
    assert "Method options (besides the defaults and the grid's T): seng: damping=0.1." in md
    assert "| seng | 8 | 1 | 2 ÷ |" in md
    assert "÷ 1 configurations diverged while they were timed" in md


def test_a_worker_row_records_its_options_and_that_it_did_not_diverge(tiny_config):
    row = worker.run_config(
        {
            **tiny_config,
            "min_time": 0.0,
            "repeats": 2,
            "max_steps": 3,
            "method": "kfac",
            "options": {"damping": 0.1},
        }
    )
    assert row["status"] == "ok", row.get("reason")
    assert row["options"] == {"damping": 0.1} and row["diverged"] is False


def test_bench_options_are_merged_under_the_users_options():
    spec = BenchSpec(["seng", "kfac"], ["mlp_tiny"], [8], [1])
    opts = {c["method"]: c["options"] for c in configurations(spec)}
    assert opts["seng"] == runner.BENCH_OPTIONS["seng"] and opts["kfac"] == {}
    spec = BenchSpec(["seng"], ["mlp_tiny"], [8], [1], options={"seng": {"damping": 1.0}})
    assert configurations(spec)[1]["options"]["damping"] == 1.0


def test_the_report_says_where_each_miss_comes_from():
    base = {"model": "mlp_tiny", "batch_size": 8, "interval": 1, "status": "ok", "time_ms": 2.0}
    slow = {
        **base,
        "method": "kfac",
        "time_ms": 10.0,
        "phases_ms": {"fb": 2.0, "refresh": 6.0, "apply": 2.0},
        "live_phases_mb": {"fb": 3.0, "refresh": 9.0},
    }
    rows = [{**base, "method": "plain"}, slow]
    attach_ratios(rows)
    rows[1].update(
        efficiency=0.6,
        floor_phases_ms={"fb": 2.0, "refresh": 3.0, "apply": 1.0},
        peak_over_floor=1.5,
        live_peak_mb=12.0,
        live_floor_mb=8.0,
    )
    md = render_markdown(rows)
    assert "## Where the misses come from" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("- **kfac**"))
    assert "worst eff 0.60 at mlp_tiny B=8 T=1" in line
    assert "refresh 6 vs 3 ms, apply 2 vs 1 ms" in line
    assert "peak during refresh, 4.0 MB over its floor of 8.0 MB" in line


@pytest.mark.parametrize("share", [False, True])
def test_floor_kernels_are_timed_per_worker_unless_shared(tmp_path, share):
    seen: list[int] = []

    def worker(config, timeout):
        seen.append(len(config["kernel_cache"]))
        return _fake_worker(config, timeout)

    spec = BenchSpec(["plain", "kfac"], ["mlp_tiny"], [8], [1, 100], share_kernel_timings=share)
    run_bench(spec, tmp_path, progress=False, argv=["precond", "bench"], worker=worker)
    # Each fake worker reports one new kernel timing: shared, the cache grows from one
    # configuration to the next; per worker, every worker starts from an empty cache.
    assert seen == ([0, 1, 2] if share else [0, 0, 0])


def _timed(ms, status="ok", **extra):
    return {"status": status, "time_ms": ms, "runner_s": 1.0, "wait_s": 0.5, **extra}


def test_median_row_keeps_the_worker_of_median_time_and_records_all():
    rows = [_timed(3.0, tag="a"), _timed(1.0, tag="b"), _timed(2.0, tag="c")]
    kept = runner.median_row(rows)
    assert kept["tag"] == "c"
    assert kept["processes"] == 3 and kept["process_times_ms"] == [3.0, 1.0, 2.0]
    assert kept["runner_s"] == 3.0 and kept["wait_s"] == 1.5 and kept["attempt_worker_s"] == 0.0
    # an even count keeps the slower of the middle two; failed workers do not count
    kept = runner.median_row([_timed(1.0, tag="a"), _timed(None, "timeout"), _timed(2.0, tag="b")])
    assert kept["tag"] == "b" and kept["process_times_ms"] == [1.0, None, 2.0]
    assert runner.median_row([_timed(None, "oom", tag="x")])["tag"] == "x"


@pytest.mark.parametrize("below", [None, 0.0])
def test_short_configurations_are_measured_in_several_workers(tmp_path, below):
    times = iter([5.0, 9.0, 7.0] * 10)
    calls: list[str] = []

    def worker(config, timeout):
        calls.append(config["method"])
        row = _fake_worker(config, timeout)
        return {**row, "time_ms": next(times) * (1 if config["method"] == "plain" else 2)}

    spec = BenchSpec(
        ["plain", "kfac"], ["mlp_tiny"], [8], [1], processes=3, processes_below_s=below
    )
    rows = run_bench(spec, tmp_path, progress=False, argv=["precond", "bench"], worker=worker)
    if below is None:
        # every configuration took three workers, a pass of the grid apart (not back to
        # back: a slow stretch of the host then takes one of them, not all three); the
        # median of each configuration's three is kept
        assert calls == ["plain", "kfac"] * 3
        assert [r["time_ms"] for r in rows] == [7.0, 14.0]
        assert rows[1]["process_times_ms"] == [18.0, 10.0, 14.0]
        assert rows[0]["env"] == rows[1]["env"] and "torch" in rows[0]["env"]
        md = (tmp_path / "results.md").read_text()
        assert "measured in 3 fresh workers (the row of median step time kept)" in md
        assert "2 configurations were measured in 3 fresh workers each" in md
        assert "spread by 57% of the kept time in the median configuration" in md
    else:
        # no configuration measures within 0 s: one worker each
        assert calls == ["plain", "kfac"]
        assert "processes" not in rows[0]
        md = (tmp_path / "results.md").read_text()
        assert "configurations measured within 0 s measured in 3 fresh workers" in md
        assert "were measured in 3 fresh workers" not in md


def test_a_slow_stretch_of_the_host_takes_one_worker_of_a_configuration_not_its_median(tmp_path):
    # The host runs 2 × slower for two consecutive workers. Back to back, a configuration's
    # three workers would put two in that stretch (its median slow); a pass apart, each
    # configuration has one worker there and the median leaves it out.
    calls: list[str] = []

    def worker(config, timeout):
        calls.append(config["method"])
        slow = len(calls) in (2, 3)
        row = _fake_worker(config, timeout)
        return {
            **row,
            "time_ms": (4.0 if config["method"] == "plain" else 8.0) * (2 if slow else 1),
        }

    spec = BenchSpec(["plain", "kfac"], ["mlp_tiny"], [8], [1], processes=3)
    rows = run_bench(spec, tmp_path, progress=False, argv=["precond", "bench"], worker=worker)
    assert [r["time_ms"] for r in rows] == [4.0, 8.0]
    assert rows[0]["process_times_ms"] == [4.0, 8.0, 4.0]
