"""Step timing: kinds of steps, their frequencies, amortisation and the phase timers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from precond import make_gradient_maker
from precond.bench.measure import (
    PhaseTimer,
    StepSample,
    run_steps,
    schedule_frequencies,
    step_kind,
    summarise,
    timed_passes,
)

CPU = torch.device("cpu")


def _samples():
    idle = [
        StepSample("idle", s, {"apply": 0.002, "backward": 0.003}) for s in (0.010, 0.011, 0.012)
    ]
    update = [
        StepSample(
            "update",
            s,
            {
                "extra_backward": 0.005,
                "curvature": 0.010,
                "refresh": 0.020,
                "apply": 0.002,
                "backward": 0.003,
            },
        )
        for s in (0.050, 0.060)
    ]
    return idle + update


def test_summarise_amortises_medians_by_schedule_frequency():
    out = summarise(_samples(), {"idle": 0.9, "update": 0.1})
    assert out["kinds"]["idle"]["n"] == 3
    assert out["kinds"]["idle"]["time_ms"] == pytest.approx(11.0)
    assert out["kinds"]["update"]["time_ms"] == pytest.approx(55.0)
    assert out["time_ms"] == pytest.approx(0.9 * 11.0 + 0.1 * 55.0)
    idle, upd = out["kinds"]["idle"]["phases_ms"], out["kinds"]["update"]["phases_ms"]
    assert idle["fb"] == pytest.approx(9.0) and idle["apply"] == pytest.approx(2.0)
    assert upd["fb"] == pytest.approx(55.0 - 37.0)
    assert out["phases_ms"]["refresh"] == pytest.approx(0.1 * 20.0)
    assert out["phases_ms"]["apply"] == pytest.approx(2.0)
    assert sum(out["phases_ms"].values()) == pytest.approx(out["time_ms"])
    assert out["missing"] == []


def test_summarise_reports_kinds_the_run_did_not_sample():
    samples = [s for s in _samples() if s.kind == "idle"]
    out = summarise(samples, {"idle": 0.99, "update": 0.01})
    assert out["missing"] == ["update"]
    assert out["time_ms"] == pytest.approx(11.0)


def test_second_order_backward_counts_as_extra_backward_on_update_steps():
    samples = [
        StepSample("idle", 0.010, {"backward": 0.004}),
        StepSample("update", 0.030, {"backward": 0.019, "curvature": 0.001}),
    ]
    out = summarise(samples, {"idle": 0.5, "update": 0.5}, backward_overridden=True)
    assert out["kinds"]["update"]["phases_ms"]["extra_backward"] == pytest.approx(15.0)
    assert out["kinds"]["update"]["phases_ms"]["fb"] == pytest.approx(14.0)
    only_update = summarise(
        samples[1:], {"update": 1.0}, backward_overridden=True, plain_backward_s=0.009
    )
    assert only_update["phases_ms"]["extra_backward"] == pytest.approx(10.0)


def test_step_kinds():
    assert step_kind(True, True) == "update"
    assert step_kind(True, False) == "curvature"
    assert step_kind(False, True) == "refresh"
    assert step_kind(False, False) == "idle"


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, t = torch.randn(16, 6), torch.randint(0, 3, (16,))
    return model, x, t


def _train_step(gm, model, x, t):
    """One training step of ``gm`` on ``(x, t)`` (no optimizer: the timing helpers need none)."""

    def step():
        model.zero_grad(set_to_none=True)
        d = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, d, t)
        gm.forward_and_backward()

    return step


def test_schedule_frequencies():
    model, _, _ = _tiny()
    assert schedule_frequencies(make_gradient_maker("plain", model)) == {"idle": 1.0}
    gm = make_gradient_maker("kfac", model, curvature_upd_interval=10)
    assert schedule_frequencies(gm) == pytest.approx({"idle": 0.9, "update": 0.1})
    gm = make_gradient_maker("kfac", model, curvature_upd_interval=2, preconditioner_upd_interval=4)
    assert schedule_frequencies(gm) == pytest.approx(
        {"idle": 0.5, "curvature": 0.25, "update": 0.25}
    )


def test_phase_timer_and_run_steps_on_kfac():
    model, x, t = _tiny()
    gm = make_gradient_maker("kfac", model, curvature_upd_interval=3)
    timer = PhaseTimer(gm, CPU)

    step = _train_step(gm, model, x, t)

    freq = schedule_frequencies(gm)
    samples, steps = run_steps(
        step,
        timer,
        freq,
        device=CPU,
        warmup=1,
        repeats=4,
        rare_repeats=2,
        max_steps=50,
        budget_s=30,
    )
    kinds = [s.kind for s in samples]
    # Steps 1, 2 idle, 3 update, 4, 5 idle, 6 update: stops when idle has 4 and update 2.
    assert kinds == ["idle", "idle", "update", "idle", "idle", "update"]
    assert steps == 7
    upd = samples[2].phases
    assert upd["curvature"] > 0 and upd["refresh"] > 0 and upd["extra_backward"] > 0
    assert "curvature" not in samples[0].phases and samples[0].phases["apply"] > 0


def test_timed_passes_measure_backward_vector_backward_and_hvp():
    model, x, t = _tiny()
    out = timed_passes(
        model, F.cross_entropy, x, t, CPU, vector_backward=True, hvp=True, min_time=0.001
    )
    assert set(out) == {"backward", "vector_backward", "hvp"}
    assert all(v > 0 for v in out.values())
    assert all(p.grad is None for p in model.parameters())


class _ScriptedTimer:
    """A stand-in for PhaseTimer: step kinds follow a script (T=3: update every third)."""

    def __init__(self, period: int = 3) -> None:
        self.period = period
        self.n = -1
        self.acc: dict[str, float] = {}

    def begin_step(self) -> None:
        self.acc = {}

    def kind(self) -> str:
        return "update" if self.n % self.period == 0 else "idle"


def _scripted_run(seconds: dict[str, float], **kw):
    timer = _ScriptedTimer()
    clock = {"now": 0.0}

    def step():
        timer.n += 1
        clock["now"] += seconds[timer.kind()]

    import precond.bench.measure as measure

    real = measure.time.perf_counter
    measure.time.perf_counter = lambda: clock["now"]  # type: ignore[assignment]
    try:
        info: dict = {}
        samples, steps = run_steps(
            step,
            timer,  # type: ignore[arg-type]
            {"idle": 2 / 3, "update": 1 / 3},
            device=CPU,
            warmup=kw.pop("warmup", 1),
            repeats=7,
            rare_repeats=3,
            max_steps=40,
            budget_s=kw.pop("budget_s", 1e9),
            info=info,
            **kw,
        )
    finally:
        measure.time.perf_counter = real  # type: ignore[assignment]
    return [s.kind for s in samples], info["stop"]


def test_slow_steps_need_fewer_samples_once_they_add_up_to_sample_time():
    fast = {"idle": 0.01, "update": 0.02}
    kinds, stop = _scripted_run(fast, sample_time=5.0)
    assert (kinds.count("idle"), kinds.count("update"), stop) == (7, 3, "samples")
    slow = {"idle": 2.0, "update": 3.0}
    kinds, stop = _scripted_run(slow, sample_time=5.0)
    # Idle needs 3 samples (6 s ≥ 5 s), update 2 (6 s): steps 1, 2 idle, 3 update, 4, 5, 6.
    assert (kinds.count("idle"), kinds.count("update"), stop) == (4, 2, "samples")
    kinds, _ = _scripted_run(slow)  # without sample_time: the full counts
    assert (kinds.count("idle"), kinds.count("update")) == (7, 3)


def test_run_steps_reports_a_budget_stop():
    kinds, stop = _scripted_run({"idle": 2.0, "update": 3.0}, budget_s=10.0)
    assert stop == "budget" and len(kinds) == 5


def test_fast_forward_skips_idle_steps_to_the_next_update():
    from precond.bench.worker import next_update_step

    model, x, t = _tiny()
    gm = make_gradient_maker("kfac", model, curvature_upd_interval=100)
    timer = PhaseTimer(gm, CPU)

    step = _train_step(gm, model, x, t)

    def forward() -> int:
        target = next_update_step(gm, gm._step)
        assert target is not None
        skipped, gm._step = target - gm._step, target
        return skipped

    info: dict = {}
    samples, steps = run_steps(
        step,
        timer,
        schedule_frequencies(gm, start=1),
        device=CPU,
        warmup=1,
        repeats=3,
        rare_repeats=2,
        max_steps=40,
        budget_s=30,
        info=info,
        fast_forward=forward,
    )
    kinds = [s.kind for s in samples]
    # Steps 1-3 idle, then 4-99 skipped: 100 update; 101-199 skipped: 200 update.
    assert kinds == ["idle", "idle", "idle", "update", "update"]
    assert steps == 6 and info["skipped"] == 96 + 99 and gm.step == 201
    assert info["stop"] == "samples"


def test_slow_warm_up_stops_once_it_adds_up_to_sample_time():
    # Step 0 (an update, 6 s) is warm-up enough: the timed steps start at step 1 (idle).
    kinds, _ = _scripted_run({"idle": 0.5, "update": 6.0}, warmup=3, sample_time=5.0)
    assert kinds[0] == "idle"
    kinds, _ = _scripted_run({"idle": 0.5, "update": 6.0}, warmup=3)  # all three warm-up steps
    assert kinds[0] == "update"
