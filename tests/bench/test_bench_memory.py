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
