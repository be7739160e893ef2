"""Operator profiles of the configurations that miss the efficiency target."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from precond.bench import runner, worker
from precond.bench.cli import build_parser, spec_from_args
from precond.bench.measure import PHASE_MARK
from precond.bench.profile import STEP_MARK, phase_groups, summarise_profile
from precond.bench.report import render_markdown
from precond.bench.runner import BenchSpec, run_bench


@dataclass
class _Event:
    """A profiler event: its total time (µs) and children; self time is what they leave."""

    name: str
    cpu_time_total: float
    cpu_children: list[_Event] = field(default_factory=list)
    start: float = 0.0

    @property
    def self_cpu_time_total(self) -> float:
        return self.cpu_time_total - sum(c.cpu_time_total for c in self.cpu_children)

    @property
    def time_range(self) -> Any:
        return SimpleNamespace(start=self.start)


def _update_step(start: float) -> _Event:
    # rest: 100 − 40 − 30 = 30 own (addmm 10); backward: 40 − 12 = 28 own (mm 15, engine 2);
    # extra_backward (inside the engine node): 12 own (mm 8); curvature: 30 own (bmm 20)
    extra = _Event(PHASE_MARK + "extra_backward", 12, [_Event("aten::mm", 8)])
    backward = _Event(
        PHASE_MARK + "backward",
        40,
        [_Event("aten::mm", 15), _Event("autograd::engine::evaluate_function: X", 14, [extra])],
    )
    curvature = _Event(PHASE_MARK + "curvature", 30, [_Event("aten::bmm", 20)])
    return _Event(STEP_MARK, 100, [_Event("aten::addmm", 10), backward, curvature], start)


def _idle_step(start: float, total: float = 50.0) -> _Event:
    apply = _Event(PHASE_MARK + "apply", 5, [_Event("aten::mul", 1), _Event("aten::mul", 2)])
    return _Event(STEP_MARK, total, [_Event("aten::addmm", 10), apply], start)


def test_summary_splits_nested_phases_and_amortises_the_kinds():
    steps = [_update_step(0.0), _idle_step(1.0), _idle_step(2.0, 60.0), _idle_step(3.0, 500.0)]
    events = [*steps, _Event("aten::unrelated", 7)]  # events outside a step are not counted
    out = summarise_profile(
        events, ["update", "idle", "idle", "idle"], {"update": 0.25, "idle": 0.75}
    )
    assert out["steps"] == {"update": 1, "idle": 3}
    g = out["groups"]
    assert list(g) == ["rest", "backward", "extra_backward", "curvature", "apply"]
    # rest: update 30 own; idle own 45, 55, 495 → median 55; amortised 0.25·30 + 0.75·55
    assert g["rest"]["ms"] == pytest.approx((0.25 * 30 + 0.75 * 55) / 1e3)
    assert g["rest"]["ops"] == [["aten::addmm", 1.0, pytest.approx(10 / 1e3)]]
    assert g["rest"]["python_ms"] == pytest.approx(g["rest"]["ms"] - 10 / 1e3)
    # backward: own 28 (its nested Fisher pass excluded), operators 15 + 2, only on updates
    assert g["backward"]["ms"] == pytest.approx(0.25 * 28 / 1e3)
    assert g["backward"]["ops_ms"] == pytest.approx(0.25 * 17 / 1e3)
    assert g["backward"]["python_ms"] == pytest.approx(0.25 * 11 / 1e3)
    assert g["extra_backward"]["ops"] == [["aten::mm", 0.25, pytest.approx(0.25 * 8 / 1e3)]]
    assert g["curvature"]["python_ms"] == pytest.approx(0.25 * 10 / 1e3)
    # apply: two calls of one operator per idle step, 3 µs of them
    assert g["apply"]["ops"] == [["aten::mul", 1.5, pytest.approx(0.75 * 3 / 1e3)]]
    assert g["apply"]["ms"] == pytest.approx(0.75 * 5 / 1e3)


def test_summary_lists_the_top_operators_and_sums_the_others():
    children = [_Event(f"aten::op{i}", float(i + 1)) for i in range(5)]
    step = _Event(STEP_MARK, 100, [_Event(PHASE_MARK + "apply", 20, children)])
    out = summarise_profile([step], ["idle"], {}, top=2)  # no frequencies: kinds as observed
    apply = out["groups"]["apply"]
    assert [name for name, _, _ in apply["ops"]] == ["aten::op4", "aten::op3"]
    assert apply["other_ops_ms"] == pytest.approx((1 + 2 + 3) / 1e3)
    assert apply["python_ms"] == pytest.approx((20 - 15) / 1e3)


def test_summary_needs_one_kind_per_step():
    with pytest.raises(ValueError, match=r"Invalid kinds: 1 for 2 profiled steps"):
        summarise_profile([_idle_step(0.0), _idle_step(1.0)], ["idle"], {})
    with pytest.raises(ValueError, match=r"Invalid phase: 'forward'"):
        phase_groups("forward")
    assert phase_groups("fb") == ("rest", "backward")


def test_a_worker_profiles_a_real_configuration(tiny_config):
    spec = {**tiny_config, "method": "kfac", "interval": 3, "warmup": 1, "op_profile": True}
    row = worker.run_config(spec)
    assert row["status"] == "ok", row["reason"]
    assert "time_ms" not in row  # a profile, not a measurement
    prof = row["op_profile"]
    assert prof["steps"]["idle"] == worker.PROFILE_REPEATS
    assert prof["steps"]["update"] == worker.PROFILE_RARE_REPEATS
    groups = prof["groups"]
    assert {"rest", "curvature", "refresh", "apply"} <= set(groups)
    assert "aten::addmm" in [name for name, _, _ in groups["rest"]["ops"]]  # the forward
    for g in groups.values():
        assert g["ms"] > 0 and g["python_ms"] >= 0
        assert g["ops_ms"] == pytest.approx(sum(t for _, _, t in g["ops"]) + g["other_ops_ms"])


def _fake(profiled: list[str]) -> Any:
    def run(config: dict[str, Any], timeout: float) -> dict[str, Any]:
        keys = ("method", "model", "batch_size", "interval", "device", "threads")
        row: dict[str, Any] = {k: config[k] for k in keys}
        if config.get("op_profile"):
            profiled.append(f"{config['method']} T={config['interval']}")
            if config["batch_size"] == 32:
                return {**row, "status": "crashed", "reason": "worker killed by SIGKILL"}
            groups = {
                "apply": {
                    "ms": 1.0,
                    "ops_ms": 0.5,
                    "python_ms": 0.5,
                    "other_ops_ms": 0.0,
                    "ops": [["aten::bmm", 2.0, 0.5]],
                }
            }
            return {
                **row,
                "status": "ok",
                "reason": None,
                "op_profile": {"steps": {"idle": 5}, "groups": groups},
            }
        b = config["batch_size"]
        time_ms = (
            float(b)
            if config["method"] == "plain"
            else (2.0 if config["interval"] == 1 else 1.6) * b
        )
        phases = {
            "fb": float(b),
            "extra_backward": 0.0,
            "curvature": 0.0,
            "refresh": 0.0,
            "apply": time_ms - b,
        }
        return {
            **row,
            "status": "ok",
            "reason": None,
            "time_ms": time_ms,
            "peak_mb": 10.0,
            "phases_ms": phases,
            "state_mb": 1.0,
            "transient_mb": 0.0,
            "floor_costs_ms": {"apply": 0.5 * b} if config["method"] != "plain" else {},
        }

    return run


def test_the_runner_profiles_exactly_the_misses(tmp_path):
    profiled: list[str] = []
    spec = BenchSpec(["plain", "kfac"], ["mlp_tiny"], [8, 32], [1, 10], profile_misses=True)
    rows = run_bench(spec, tmp_path, progress=False, worker=_fake(profiled), figures=False)
    # efficiency (B + B/2) / 2B = 0.75 at T=1 (a miss), / 1.6B = 0.94 at T=10
    assert profiled == ["kfac T=1", "kfac T=1"]
    by = {(r["method"], r["batch_size"], r["interval"]): r for r in rows}
    assert by[("kfac", 8, 1)]["op_profile"]["groups"]["apply"]["ops"][0][0] == "aten::bmm"
    assert by[("kfac", 32, 1)]["op_profile"] == {"error": "crashed: worker killed by SIGKILL"}
    assert "op_profile" not in by[("kfac", 8, 10)] and "op_profile" not in by[("plain", 8, 1)]
    assert by[("kfac", 8, 1)]["time_ms"] == 16.0  # the measured row is kept as it was
    md = (tmp_path / "results.md").read_text()
    assert "## Operator profiles of the misses" in md
    assert "- **kfac mlp_tiny B=8 T=1** (eff 0.75): apply 8 vs 4 ms, profiled apply 1 ms" in md
    assert "`aten::bmm` 0.5 (2.0×)" in md
    assert "- **kfac mlp_tiny B=32 T=1** (eff 0.75): profile failed: crashed: worker killed" in md
    assert "profiling the misses" in md
    # without the option nothing is profiled, and the report has no such section
    profiled.clear()
    spec = BenchSpec(["plain", "kfac"], ["mlp_tiny"], [8], [1])
    rows = run_bench(spec, None, progress=False, worker=_fake(profiled))
    assert profiled == [] and "Operator profiles" not in render_markdown(rows)


def test_profiles_stop_at_the_run_deadline(tmp_path, monkeypatch):
    # A slow host makes more configurations miss and each profile slower: past
    # profile_until_s no profile starts, and the misses left say why they have none.
    profiled: list[str] = []
    base = _fake(profiled)
    clock = [0.0]
    monkeypatch.setattr(runner.time, "perf_counter", lambda: clock[0])

    def worker(config: dict[str, Any], timeout: float) -> dict[str, Any]:
        clock[0] += 10.0  # every worker takes 10 s of the run's time
        return base(config, timeout)

    spec = BenchSpec(
        ["plain", "kfac"], ["mlp_tiny"], [8, 16, 32], [1], profile_misses=True, profile_until_s=65.0
    )
    rows = run_bench(spec, tmp_path, progress=False, worker=worker, figures=False)
    # six measurements take the clock to 60 s; the first profile starts at 60 s (before the
    # deadline) and ends at 70 s, past it: the other two misses are not profiled
    assert profiled == ["kfac T=1"]
    by = {(r["method"], r["batch_size"]): r for r in rows}
    assert "groups" in by[("kfac", 8)]["op_profile"]
    for b in (16, 32):
        assert by[("kfac", b)]["op_profile"] == {"skipped": runner.PROFILE_DEADLINE_REASON}
        assert by[("kfac", b)]["time_ms"] == 2.0 * b  # the measured rows are kept
    md = (tmp_path / "results.md").read_text()
    assert "- **kfac mlp_tiny B=16 T=1** (eff 0.75): not profiled: the run's time" in md
    assert "misses profiled until 1.08 min into the run" in md


def test_profile_deadline_is_validated():
    with pytest.raises(ValueError, match="profile_until_s"):
        BenchSpec(["plain"], ["mlp_tiny"], [8], [1], profile_until_s=-1.0)


def test_cli_switches_the_profiles():
    def spec(*argv: str, grid: str = "cpu") -> BenchSpec:
        return spec_from_args(build_parser().parse_args(["--grid", grid, *argv]))[0]

    assert spec().profile_misses is True
    assert spec("--no-profile-misses").profile_misses is False
    assert spec(grid="smoke").profile_misses is False
    assert spec("--profile-misses", grid="smoke").profile_misses is True
    assert spec().profile_until_s == 1620.0
    assert spec("--profile-until", "60").profile_until_s == 60.0
    assert spec(grid="smoke").profile_until_s is None
