"""Contention: other processes on the worker's cores are detected, flagged and re-measured."""

from __future__ import annotations

import pytest

from precond.bench import runner
from precond.bench.contention import ContentionMeter, busy_cpu_seconds, is_contended
from precond.bench.floor import FACTORISATION_KINDS, kernel_slowdown
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


def test_slow_workers_are_measured_again_and_flagged():
    calls = []

    def worker(config, timeout):
        calls.append(config["method"])
        # kfac's first worker runs its idle steps 2.5x slower than its own SGD step, shampoo's
        # every one; the others 1.1x (within the limit).
        slow = config["method"] == "shampoo" or calls.count("kfac") == 1
        fb = 25.0 if slow else 11.0
        return {
            **{k: config[k] for k in ("method", "model", "batch_size", "interval", "device")},
            "status": "ok",
            "time_ms": fb + 1.0,
            "peak_mb": 1.0,
            "other_cores": 0.0,
            "sgd_in_process_ms": 10.0,
            "kinds": {"idle": {"n": 7, "time_ms": fb + 1.0, "phases_ms": {"fb": fb}}},
        }

    spec = BenchSpec(["plain", "kfac", "shampoo"], ["mlp_tiny"], [8], [10], retry_contended=2)
    rows = run_bench(spec, None, progress=False, worker=worker)
    # slow workers are measured again after all the other configurations
    assert calls == ["plain", "kfac", "shampoo", "kfac", "shampoo", "shampoo"]
    by = {r["method"]: r for r in rows}
    assert by["kfac"]["attempts"] == 2 and not by["kfac"]["slow"] and by["kfac"]["deferred"]
    assert "deferred" not in by["plain"]
    assert by["kfac"]["time_ms"] == 12.0  # the row that did not run slow is kept
    assert by["shampoo"]["attempts"] == 3 and by["shampoo"]["slow"]
    assert runner.slowdown(by["shampoo"]) == 2.5
    assert runner.slowdown(by["plain"]) == pytest.approx(1.1)
    assert runner.slowdown({**by["plain"], "kinds": {}}) is None  # T = 1: no idle steps
    md = render_markdown(rows)
    assert "| shampoo | 8 | 10 | 26 § |" in md
    assert "§ 1 configurations ran slow in every attempt" in md
    assert "2 configurations were measured again because their worker" in md


def test_workers_that_timed_their_floor_kernels_slow_are_measured_again_after_the_run():
    calls = []

    def worker(config, timeout):
        calls.append(config["method"])
        # kfac's first worker times its factorisation at 2x the others' (and its steps with
        # it); its SGD step and idle steps are not slow, so only the kernels can tell.
        slow = config["method"] == "kfac" and calls.count("kfac") == 1
        chol = 20.0 if slow else 10.0
        row = {
            **{k: config[k] for k in ("method", "model", "batch_size", "interval", "device")},
            "status": "ok",
            "time_ms": 5.0 if config["method"] == "plain" else 15.0 + chol,
            "peak_mb": 1.0,
            "other_cores": 0.0,
            "sgd_in_process_ms": 5.0,
            "kinds": {"update": {"n": 7, "time_ms": 15.0 + chol, "phases_ms": {"fb": 5.0}}},
        }
        if config["method"] != "plain":
            row["floor_kernels"] = [
                {"phase": "refresh", "kind": "cholesky", "count": 1, "ms": chol, "key": "c"}
            ]
            row["floor_costs_ms"] = {"refresh": chol}
        return row

    spec = BenchSpec(
        ["plain", "kfac", "ekfac", "shampoo"], ["mlp_tiny"], [8], [1], retry_contended=2
    )
    rows = run_bench(spec, None, progress=False, worker=worker)
    assert calls == ["plain", "kfac", "ekfac", "shampoo", "kfac"]
    by = {r["method"]: r for r in rows}
    assert by["kfac"]["deferred"] and by["kfac"]["attempts"] == 2 and not by["kfac"]["slow"]
    assert by["kfac"]["time_ms"] == 25.0 and by["kfac"]["kernel_slowdown"] == 1.0
    assert by["ekfac"]["kernel_slowdown"] == 1.0 and "deferred" not in by["ekfac"]
    # the limit is 1.25 x and 0.5 ms per step over the run's median
    row = {"status": "ok", "interval": 1}
    kernels = [{"phase": "refresh", "kind": "cholesky", "count": 1, "ms": 1.3, "key": "c"}]
    assert runner.is_slow({**row, "floor_kernels": kernels}, None, {"c": 1.0}) is False
    kernels[0]["ms"] = 13.0
    assert runner.is_slow({**row, "floor_kernels": kernels}, None, {"c": 10.0})
    assert not runner.is_slow({**row, "floor_kernels": kernels, "interval": 10}, None, {"c": 10.0})
    assert not runner.is_slow({**row, "floor_kernels": kernels})  # no reference yet


def test_failed_rows_are_not_retried():
    calls = []

    def worker(config, timeout):
        calls.append(1)
        return runner._failed(config, "oom", "out of memory")

    spec = BenchSpec(["plain"], ["mlp_tiny"], [8], [1], retry_contended=3)
    rows = run_bench(spec, None, progress=False, worker=worker)
    assert len(calls) == 1 and rows[0]["status"] == "oom"


def test_the_idle_wait_is_skipped_while_the_last_configuration_saw_idle_cores(monkeypatch):
    waits = []
    monkeypatch.setattr(runner, "wait_until_idle", lambda threads, wait: waits.append(wait))
    loads = iter([None, 0.0, 0.0, 1.5, 0.0, 0.0])  # the 4th is contended, then clean

    def worker(config, timeout):
        return {
            **{k: config[k] for k in ("method", "model", "batch_size", "interval", "device")},
            "status": "ok",
            "time_ms": 10.0,
            "peak_mb": 1.0,
            "other_cores": next(loads),
            "worker_s": 2.0,
        }

    spec = BenchSpec(
        ["plain", "kfac"], ["mlp_tiny"], [8], [1, 10, 100, 1000], threads=2, wait_idle=5.0,
        retry_contended=1,
    )  # fmt: skip
    rows = run_bench(spec, None, progress=False, worker=worker)
    # Waits: before the first (nothing known), after the unknown load of the first, and before
    # the retry of the contended one; none after a row that saw idle cores.
    assert len(waits) == 3
    assert [r["attempts"] for r in rows] == [1, 1, 1, 2, 1]
    assert rows[3]["attempt_worker_s"] == 4.0 and rows[3]["worker_s"] == 2.0
    assert all(r["runner_s"] >= r["wait_s"] >= 0 for r in rows)


def test_time_accounting_splits_the_wall_time():
    rows = [
        {"worker_s": 2.0, "attempt_worker_s": 4.0, "wait_s": 1.0, "runner_s": 6.0},
        {"worker_s": 3.0, "wait_s": 0.0, "runner_s": 3.5, "parts_s": {"steps": 2.0, "live": 0.5}},
    ]
    acc = runner.time_accounting(rows, elapsed=10.0)
    assert acc.pop("profiles") == 0.0
    rows[1]["profile_s"] = 0.25  # profiling a miss: its own item, not the runner's "other"
    assert runner.time_accounting(rows, elapsed=10.0)["other"] == pytest.approx(0.25)
    assert acc == {
        "part_steps": 2.0,
        "part_live": 0.5,
        "elapsed": 10.0,
        "workers": 7.0,
        "kept": 5.0,
        "workers_cpu": 0.0,
        "waits": 1.0,
        "startup": 1.5,
        "other": 0.5,
    }
    md = render_markdown([], {"elapsed_s": 600.0, "time_s": {**acc, "workers": 540.0}})
    assert "Wall time of the run: 10.0 min (inside workers 9.0 min" in md


def test_tiny_steps_are_not_slow_by_ratio_alone():
    row = {
        "status": "ok",
        "sgd_in_process_ms": 0.3,
        "kinds": {"idle": {"phases_ms": {"fb": 0.9}}},  # 3x, but 0.6 ms over
    }
    assert runner.slowdown(row) == pytest.approx(3.0)
    assert not runner.is_slow(row)
    row["sgd_in_process_ms"], row["kinds"]["idle"]["phases_ms"]["fb"] = 3.0, 6.0  # 2x, 3 ms
    assert runner.is_slow(row)


def test_a_worker_whose_sgd_step_runs_slow_against_the_run_is_measured_again():
    calls = []

    def worker(config, timeout):
        calls.append(config["method"])
        # T = 1: no idle steps. kfac's first worker times SGD's step at 2.2x the run's SGD row
        # (every phase slower), its second at 1.1x.
        slow = config["method"] == "kfac" and calls.count("kfac") == 1
        return {
            **{k: config[k] for k in ("method", "model", "batch_size", "interval", "device")},
            "status": "ok",
            "time_ms": 10.0 if config["method"] == "plain" else 40.0 if slow else 20.0,
            "peak_mb": 1.0,
            "other_cores": 0.0,
            "sgd_in_process_ms": 22.0 if slow else 11.0,
            "kinds": {"update": {"n": 7, "time_ms": 20.0, "phases_ms": {"fb": 10.0}}},
        }

    spec = BenchSpec(["plain", "kfac"], ["mlp_tiny"], [8], [1], retry_contended=2)
    rows = run_bench(spec, None, progress=False, worker=worker)
    assert calls == ["plain", "kfac", "kfac"]
    kfac = rows[1]
    assert kfac["attempts"] == 2 and not kfac["slow"] and kfac["time_ms"] == 20.0
    assert runner.baseline_slowdown(kfac, 10.0) == pytest.approx(1.1)
    # the limit is 1.25 x and 0.15 ms over: 1.35 x of the dense grid's 0.2 ms step is noise,
    # 1.35 x of 0.89 ms (mlp512's SGD step at B=32) is not, nor 1.3 x of 2.9 ms (at B=128)
    row = {"status": "ok", "sgd_in_process_ms": 1.35 * 0.2}
    assert not runner.is_slow(row, 0.2)
    assert runner.is_slow({**row, "sgd_in_process_ms": 1.35 * 0.89}, 0.89)
    assert not runner.is_slow({**row, "sgd_in_process_ms": 1.2 * 0.89}, 0.89)
    assert runner.is_slow({**row, "sgd_in_process_ms": 1.3 * 2.9}, 2.9)
    assert not runner.is_slow({**row, "sgd_in_process_ms": 1.2 * 2.9}, 2.9)
    assert not runner.is_slow(row)  # no baseline: only the idle-step rule


def test_of_attempts_that_all_ran_slow_the_least_slow_is_kept():
    calls = []
    # kfac's three workers time SGD's step at 2.6x, 1.8x and 2.2x the run's 1 ms: all slow
    sgd = {1: 2.6, 2: 1.8, 3: 2.2}

    def worker(config, timeout):
        calls.append(config["method"])
        n = calls.count("kfac")
        return {
            **{k: config[k] for k in ("method", "model", "batch_size", "interval", "device")},
            "status": "ok",
            "time_ms": 1.0 if config["method"] == "plain" else 10.0 * sgd[n],
            "peak_mb": 1.0,
            "other_cores": 0.0,
            "sgd_in_process_ms": sgd[n] if config["method"] == "kfac" else None,
            "kinds": {"update": {"n": 7, "time_ms": 1.0, "phases_ms": {"fb": 1.0}}},
        }

    spec = BenchSpec(["plain", "kfac"], ["mlp_tiny"], [8], [1], retry_contended=2)
    rows = run_bench(spec, None, progress=False, worker=worker)
    kfac = rows[1]
    assert calls.count("kfac") == 3 and kfac["attempts"] == 3
    # against the run's reference: the 25th percentile of the SGD steps 1.0 (plain) and 2.6
    # (kfac's first worker) is 1.4
    assert kfac["slow"] and kfac["sgd_slowdown"] == pytest.approx(1.8 / 1.4)
    assert kfac["time_ms"] == pytest.approx(18.0)


def _sgd_worker(calls, sgd_ms, time_ms):
    """A fake worker: the n-th worker of a method times SGD at ``sgd_ms(method, n)``."""

    def worker(config, timeout):
        calls.append(config["method"])
        n = calls.count(config["method"])
        sgd = sgd_ms(config["method"], n)
        plain = config["method"] == "plain"
        return {
            **{k: config[k] for k in ("method", "model", "batch_size", "interval", "device")},
            "status": "ok",
            "time_ms": sgd if plain else time_ms(config["method"], n),
            "peak_mb": 1.0,
            "other_cores": 0.0,
            "sgd_in_process_ms": None if plain else sgd,
            "kinds": {"update": {"n": 7, "time_ms": 1.0, "phases_ms": {"fb": sgd}}},
        }

    return worker


def test_a_slow_stretch_through_the_sgd_row_is_judged_against_the_whole_run():
    # The SGD row and shampoo's first worker ran in the host's slow mode (SGD's step 1.3 ms
    # against 0.9 ms). Against the SGD row shampoo's worker looks normal; against the run's
    # reference (the 25th percentile of every worker's SGD step) both are slow and measured
    # again, the SGD row first.
    calls: list[str] = []
    slow = {("plain", 1), ("shampoo", 1)}
    worker = _sgd_worker(
        calls,
        lambda m, n: 1.3 if (m, n) in slow else 0.9,
        lambda m, n: 30.0 if (m, n) in slow else 20.0,
    )
    methods = ["plain", "kfac", "ekfac", "shampoo", "soap"]
    spec = BenchSpec(methods, ["mlp_tiny"], [8], [1], retry_contended=2)
    rows = run_bench(spec, None, progress=False, worker=worker)
    assert calls == [*methods, "plain", "shampoo"]
    by = {r["method"]: r for r in rows}
    assert by["plain"]["deferred"] and by["plain"]["time_ms"] == 0.9
    assert by["shampoo"]["deferred"] and by["shampoo"]["time_ms"] == 20.0
    assert not by["shampoo"]["slow"] and by["shampoo"]["sgd_slowdown"] == pytest.approx(1.0)
    assert "deferred" not in by["kfac"] and by["kfac"]["sgd_slowdown"] == pytest.approx(1.0)


def test_a_configuration_of_several_workers_keeps_the_median_of_those_not_slow():
    # kfac's first and third workers ran in the slow mode (13 and 14 ms), its second not (9
    # ms): the row kept is the second worker's, not the median of all three (13 ms), and the
    # configuration need not be measured again.
    calls: list[str] = []
    worker = _sgd_worker(
        calls,
        lambda m, n: 1.3 if m == "kfac" and n != 2 else 0.9,
        lambda m, n: {1: 13.0, 2: 9.0, 3: 14.0}[n],
    )
    spec = BenchSpec(["plain", "kfac"], ["mlp_tiny"], [8], [1], retry_contended=2, processes=3)
    rows = run_bench(spec, None, progress=False, worker=worker)
    assert calls == ["plain", "kfac"] * 3
    kfac = rows[1]
    assert kfac["time_ms"] == 9.0 and not kfac["slow"] and "deferred" not in kfac
    assert kfac["process_times_ms"] == [13.0, 9.0, 14.0] and kfac["processes"] == 3
    # of workers that all ran slow, the median is kept (and measured again later)
    group = [{"status": "ok", "time_ms": t, "slow": True} for t in (3.0, 1.0, 2.0)]
    assert runner.median_row(group)["time_ms"] == 2.0


def test_slow_rows_past_the_runs_deadline_keep_their_row_and_say_so():
    calls: list[str] = []
    worker = _sgd_worker(
        calls,
        lambda m, n: 1.3 if m == "kfac" else 0.9,
        lambda m, n: 30.0 if m == "kfac" else 20.0,
    )
    methods = ["plain", "kfac", "ekfac", "shampoo"]
    spec = BenchSpec(methods, ["mlp_tiny"], [8], [1], retry_contended=2, remeasure_until_s=0.0)
    rows = run_bench(spec, None, progress=False, worker=worker)
    assert calls == methods  # the deadline had passed: nothing measured again
    kfac = rows[1]
    assert kfac["slow"] and kfac["remeasure"] == "deadline" and kfac["attempts"] == 1
    md = render_markdown(rows)
    assert "| kfac | 8 | 1 | 30 § |" in md
    assert "§ 1 configurations ran slow and were not measured again" in md
    with pytest.raises(ValueError, match="remeasure_until_s"):
        BenchSpec(methods, ["mlp_tiny"], [8], [1], remeasure_until_s=-1.0)


def test_further_workers_stop_at_the_runs_deadline_and_say_so(monkeypatch):
    # each measurement takes 10 s of the run's clock; past 45 s no further worker starts:
    # plain and kfac get a second worker, ekfac none, and no configuration gets a third
    clock = {"t": 0.0}
    calls: list[str] = []
    base = _sgd_worker(calls, lambda m, n: 0.9, lambda m, n: {1: 10.0, 2: 12.0}[n])

    def worker(config, timeout):
        clock["t"] += 10.0
        return base(config, timeout)

    fake_time = type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock["t"])})
    monkeypatch.setattr(runner, "time", fake_time)
    methods = ["plain", "kfac", "ekfac"]
    spec = BenchSpec(methods, ["mlp_tiny"], [8], [1], processes=3, further_until_s=45.0)
    rows = run_bench(spec, None, progress=False, worker=worker)
    assert calls == [*methods, "plain", "kfac"]
    by = {r["method"]: r for r in rows}
    assert [by[m]["processes"] for m in methods] == [2, 2, 1]
    assert all(by[m]["further"] == "deadline" for m in methods)
    assert by["kfac"]["process_times_ms"] == [10.0, 12.0] and by["kfac"]["time_ms"] == 12.0
    md = render_markdown(rows)
    assert "3 configurations kept fewer workers than the others" in md
    with pytest.raises(ValueError, match="further_until_s"):
        BenchSpec(methods, ["mlp_tiny"], [8], [1], further_until_s=-1.0)


def test_factorisations_that_ran_slow_mark_the_worker_slow_when_the_other_kernels_dilute_them():
    # the host's slow stretches slow LAPACK, not matrix products: K-FAC's cnn_small rows at
    # B=32 timed their factorisations at 1.25-1.28 x the run's reference and all their kernels
    # at 1.22-1.24 x (the run at a72c5c7)
    row = {"status": "ok", "interval": 1}
    kernels = [
        {"phase": "refresh", "kind": "cholesky_inverse", "count": 1, "ms": 14.0, "key": "c"},
        {"phase": "apply", "kind": "bmm", "count": 2, "ms": 20.0, "key": "b"},
    ]
    reference = {"c": 10.0, "b": 10.0}
    slowed = {**row, "floor_kernels": kernels}
    # all kernels: 34 ms against 30 (1.13 x); the factorisation alone: 1.4 x and 4 ms over
    assert kernel_slowdown(slowed, reference)[0] == pytest.approx(34.0 / 30.0)
    assert kernel_slowdown(slowed, reference, FACTORISATION_KINDS) == (
        pytest.approx(1.4),
        pytest.approx(10.0),
    )
    assert runner.is_slow(slowed, None, reference)
    # below the margin per step (a refresh every 100 steps: 0.04 ms over) it is not
    assert not runner.is_slow({**slowed, "interval": 100}, None, reference)
    kernels[0]["ms"] = 12.0  # 1.2 x: within the limit
    assert not runner.is_slow(slowed, None, reference)
    # the floor without factorisations has no such ratio
    assert kernel_slowdown({**row, "floor_kernels": kernels[1:]}, reference, ("cholesky",)) is None
