from __future__ import annotations

import itertools

import pytest
from torch import nn

from precond import PreconditioningConfig, Schedule
from precond.config import PreconditioningConfig as C

ERRORS = [
    (dict(damping=-1.0), r"Invalid damping: -1.0. Must be >= 0.0."),
    (dict(damping=float("nan")), r"Invalid damping: nan. Must be finite."),
    (dict(damping="1"), r"Invalid damping: '1'. Must be a real number."),
    (dict(data_size=0), r"Invalid data_size: 0. Must be >= 1."),
    (dict(data_size=2.5), r"Invalid data_size: 2.5. Must be an integer."),
    (dict(curvature_upd_interval=0), r"Invalid curvature_upd_interval: 0. Must be >= 1."),
    (dict(curvature_warmup_steps=-1), r"Invalid curvature_warmup_steps: -1. Must be >= 0."),
    (dict(preconditioner_upd_interval=0), r"Invalid preconditioner_upd_interval: 0. Must be >= 1."),
    (
        dict(preconditioner_warmup_steps=-2),
        r"Invalid preconditioner_warmup_steps: -2. Must be >= 0.",
    ),
    (
        dict(curvature_upd_ratio=0.5),
        r"Invalid num_total_steps: None. curvature_upd_ratio=0.5 needs",
    ),
    (
        dict(curvature_upd_ratio=1.5, num_total_steps=10),
        r"Invalid curvature_upd_ratio: 1.5. Must be > 0.0 and <= 1.0.",
    ),
    (
        dict(preconditioner_upd_ratio=0.0, num_total_steps=10),
        r"Invalid preconditioner_upd_ratio: 0.0. Must be > 0.0 and <= 1.0.",
    ),
    (
        dict(curvature_upd_ratio=0.5, curvature_upd_interval=3, num_total_steps=10),
        r"Invalid curvature_upd_interval: 3. Cannot be combined with curvature_upd_ratio=0.5",
    ),
    (
        dict(curvature_upd_ratio=0.2, curvature_warmup_steps=5, num_total_steps=10),
        r"Invalid curvature_warmup_steps: 5. Must be <= the number of updates",
    ),
    (dict(num_total_steps=0), r"Invalid num_total_steps: 0. Must be >= 1."),
    (
        dict(interval_type="cubic"),
        r"Invalid interval_type: 'cubic'. Supported: \('constant', 'linear'\).",
    ),
    (dict(ema_decay=1.0), r"Invalid ema_decay: 1.0. Must be >= 0.0 and < 1.0."),
    (dict(ema_decay=-0.1), r"Invalid ema_decay: -0.1. Must be >= 0.0 and < 1.0."),
    (
        dict(unsupported="ignore"),
        r"Invalid unsupported: 'ignore'. Supported: \('error', 'skip', 'diag'\).",
    ),
    (dict(ignore_modules=[3]), r"Invalid ignore_modules: 3. Entries must be nn.Module objects"),
    (dict(ignore_modules=5), r"Invalid ignore_modules: 5. Must be a sequence"),
    (dict(seed=-1), r"Invalid seed: -1. Must be >= 0."),
]


@pytest.mark.parametrize("kwargs,match", ERRORS, ids=[m.split(":")[0] for _, m in ERRORS])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreconditioningConfig(**kwargs)


def test_kw_only():
    with pytest.raises(TypeError):
        C(1e-3)  # type: ignore[misc]


def test_effective_damping_and_defaults():
    c = PreconditioningConfig(damping=0.5, data_size=100)
    assert c.effective_damping == pytest.approx(0.005)
    assert PreconditioningConfig().effective_damping == 1e-3


def test_ignore_modules_matching():
    lin = nn.Linear(2, 2)
    c = PreconditioningConfig(ignore_modules=[nn.Conv2d, "head.*", lin])
    assert c.is_ignored("x", nn.Conv2d(1, 1, 1))
    assert c.is_ignored("head.fc", nn.Linear(1, 1))
    assert not c.is_ignored("head", nn.Linear(1, 1))
    assert c.is_ignored("anything", lin)
    assert not c.is_ignored("body.fc", nn.Linear(1, 1))
    assert PreconditioningConfig(ignore_modules="fc").is_ignored("fc", nn.Linear(1, 1))


def _updates(s: Schedule, n: int) -> list[int]:
    return [i for i in range(n) if s.is_update_step(i)]


def test_interval_schedule_with_warmup():
    assert _updates(Schedule(interval=3), 10) == [0, 3, 6, 9]
    assert _updates(Schedule(interval=3, warmup_steps=2), 10) == [0, 1, 2, 5, 8]
    assert _updates(Schedule(interval=1), 4) == [0, 1, 2, 3]


def test_preconditioner_follows_curvature_by_default():
    c = PreconditioningConfig(curvature_upd_interval=4)
    assert _updates(c.preconditioner_schedule(), 9) == [0, 4, 8]
    c = PreconditioningConfig(curvature_upd_interval=2, preconditioner_upd_interval=5)
    assert _updates(c.curvature_schedule(), 10) == [0, 2, 4, 6, 8]
    assert _updates(c.preconditioner_schedule(), 10) == [0, 5]


def test_ratio_schedule_constant():
    s = Schedule(ratio=0.25, num_total_steps=20)
    ups = _updates(s, 20)
    assert ups == [0, 4, 8, 12, 16]
    assert s.num_updates(20) == 5
    # past the planned length the last gap repeats
    assert _updates(s, 30)[5:] == [20, 24, 28]


def test_ratio_schedule_warmup_and_linear():
    s = Schedule(ratio=0.3, num_total_steps=20, warmup_steps=2)
    ups = _updates(s, 20)
    assert ups[:2] == [0, 1] and len(ups) == 6
    lin = Schedule(ratio=0.25, num_total_steps=40, interval_type="linear")
    ups = _updates(lin, 40)
    gaps = [b - a for a, b in itertools.pairwise(ups)]
    assert len(ups) == 10
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]
