"""The memory probe, run in fresh subprocesses as the harness runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from precond.bench.memory import MemoryProbe, read_status_kb

_SCRIPT = """
import json, sys, torch
from precond.bench.memory import MemoryProbe
out = []
for mb in map(int, sys.argv[1:]):
    probe = MemoryProbe("cpu")
    probe.start()
    x = torch.ones(mb * 1024 * 1024 // 4)   # touched: ones writes every page
    del x                                   # freed before the reading: the peak must remember it
    r = probe.read()
    out.append({"mb": mb, "growth_mb": r.growth_mb, "probe": r.probe})
print(json.dumps(out))
"""


def test_probe_in_a_fresh_process_reports_at_least_the_allocated_megabytes():
    sizes = [64, 256, 32]
    res = subprocess.run(
        [sys.executable, "-c", _SCRIPT, *map(str, sizes)],
        capture_output=True,
        text=True,
        check=True,
    )
    readings = json.loads(res.stdout.strip().splitlines()[-1])
    assert [r["mb"] for r in readings] == sizes
    for r in readings:
        assert r["growth_mb"] >= r["mb"] * 0.98, r
        assert r["growth_mb"] <= r["mb"] + 48, r  # and not much more than that
    if sys.platform.startswith("linux"):
        assert {r["probe"] for r in readings} == {"vmhwm"}


def test_probe_is_reset_at_start():
    # A peak before start() does not count.
    import torch

    probe = MemoryProbe("cpu")
    x = torch.ones(16 * 1024 * 1024)  # 64 MB
    del x
    probe.start()
    y = torch.ones(1024)
    reading = probe.read()
    del y
    if reading.probe == "vmhwm":
        assert reading.growth_mb < 32
    assert reading.growth_mb >= 0


def test_status_fields_on_linux():
    status = read_status_kb("VmRSS", "VmHWM")
    if status is None:
        pytest.skip("no /proc on this platform")
    assert status["VmHWM"] >= status["VmRSS"] > 0


def test_live_probe_counts_tensor_bytes_exactly():
    import torch

    from precond.bench.memory import LiveTensorProbe

    probe = LiveTensorProbe()
    if not probe.start():
        pytest.skip("the profiler's memory events are not available")
    a = torch.empty(1024 * 1024)  # 4 MB
    b = torch.empty(512 * 1024)  # 2 MB
    del a
    c = torch.empty(256 * 1024)  # 1 MB: the peak stays at 6 MB
    reading = probe.stop()
    assert reading is not None
    assert reading.peak_mb == pytest.approx(6.0)
    assert reading.end_mb == pytest.approx(3.0)
    del b, c
    assert probe.stop() is None  # a stopped probe reads nothing


def test_live_pass_sees_gradients_momentum_and_the_warm_update():
    import torch

    from precond.bench.problems import get_problem
    from precond.bench.worker import live_tensor_pass, next_update_step
    from precond.registry import make_gradient_maker

    problem = get_problem("mlp_tiny")
    cpu = torch.device("cpu")
    plain = live_tensor_pass("plain", problem, {}, 8, 0, 1e-3, cpu)
    if plain is None:
        pytest.skip("the profiler's memory events are not available")
    params_mb = sum(p.numel() * 4 for p in problem.model_fn().parameters()) / 2**20
    # After a step SGD holds a gradient and a momentum buffer per parameter, and the gradient
    # maker the last logits (for the loss inputs of Fisher methods): nothing else.
    logits_mb = 8 * problem.num_classes * 4 / 2**20
    assert plain["live_end_mb"] == pytest.approx(2 * params_mb + logits_mb)
    assert plain["live_growth_mb"] >= plain["live_end_mb"]
    assert plain["live_steps"] == [0, 1]
    kfac = live_tensor_pass("kfac", problem, {"curvature_upd_interval": 10}, 8, 0, 1e-3, cpu)
    assert kfac is not None and kfac["live_steps"] == [0, 1, 10]
    assert kfac["live_end_mb"] > plain["live_end_mb"]  # factors and inverses
    gm = make_gradient_maker("kfac", problem.model_fn(), curvature_upd_interval=10)
    assert next_update_step(gm, 1) == 10 and next_update_step(gm, 0) == 0
    assert next_update_step(make_gradient_maker("plain", problem.model_fn()), 1) is None


def test_marks_split_the_timeline_into_labelled_peaks():
    import torch

    from precond.bench.memory import LiveTensorProbe

    probe = LiveTensorProbe()
    if not probe.start():
        pytest.skip("the profiler's memory events are not available")
    probe.mark("a")
    a = torch.empty(1024 * 1024)  # 4 MB
    probe.mark("b")
    b = torch.empty(2 * 1024 * 1024)  # 8 MB: 12 MB live
    del b
    probe.mark("a")
    c = torch.empty(256 * 1024)  # 5 MB live
    reading = probe.stop()
    del a, c
    assert reading is not None
    assert reading.segments_mb == pytest.approx({"a": 5.0, "b": 12.0})
    assert reading.peak_mb == pytest.approx(12.0) and reading.end_mb == pytest.approx(5.0)
