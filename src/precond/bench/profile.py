"""Where a configuration's time goes: an operator profile of its steps, phase by phase.

The timed steps say *how much* a phase exceeds its floor; this says *why*. A worker runs the
configuration again (same model, batch, method and interval), warms it up, then runs a few steps
of every kind under :mod:`torch.profiler`, each step and each phase of the gradient maker inside
a named range (:data:`~precond.bench.measure.PHASE_MARK`). Per phase it reports:

* the operators that ran in it (autograd's node evaluations included), by their *self* time
  (time inside the operator, not in the operators it called), with calls per step;
* the phase's own time (its range, less the ranges of phases nested in it, such as a Fisher
  pass inside the loss's backward);
* the rest: own time not inside any operator, i.e. the Python code and dispatch between the
  operators. At small batches this is often the largest item.

Phases are the gradient maker's methods as the timer sees them (``_backward``: the loss's
backward with whatever the method adds to it on curvature steps, ``extra_backward``,
``curvature``, ``refresh``, ``apply``); ``rest`` is everything else in the step (forward,
the plain backward, the optimizer). Per-step figures are medians over the profiled steps of each
kind (an operator's time and calls separately), amortised over the step kinds by the schedule's
frequencies, as the headline time is.

The profiler adds about a microsecond per operator, so profiled phases run somewhat slower than
the timed ones: the profile attributes time, it does not replace the measurement. On CUDA the
operator times are host-side (dispatch and launch).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from statistics import median
from typing import Any

from .measure import PHASE_MARK

__all__ = ["GROUPS", "STEP_MARK", "TOP_OPS", "phase_groups", "summarise_profile"]

#: Profiler range of one whole step.
STEP_MARK = PHASE_MARK + "step"

#: Groups of a profile: ``rest`` (outside every phase) and the timer's phases.
GROUPS = ("rest", "backward", "extra_backward", "curvature", "refresh", "apply")

#: Operators listed per group (the rest are summed in ``other_ops_ms``).
TOP_OPS = 8

#: Profile groups holding the work of each reported phase (``fb`` is the step outside the
#: method's phases; the loss's backward holds, on curvature steps, what a method adds to it).
_PHASE_GROUPS = {
    "fb": ("rest", "backward"),
    "extra_backward": ("extra_backward", "backward"),
    "curvature": ("curvature",),
    "refresh": ("refresh",),
    "apply": ("apply",),
}


def phase_groups(phase: str) -> tuple[str, ...]:
    """The profile groups in which a reported phase's work runs.

    Args:
        phase: A phase of the rows (``fb``, ``extra_backward``, ``curvature``, ``refresh``,
            ``apply``).

    Returns:
        Group names (see :data:`GROUPS`).

    Raises:
        ValueError: For an unknown phase.
    """
    if phase not in _PHASE_GROUPS:
        raise ValueError(f"Invalid phase: {phase!r}. Known: {tuple(_PHASE_GROUPS)}.")
    return _PHASE_GROUPS[phase]


class _Step:
    """One profiled step: own time per group and calls and self time per operator (µs)."""

    def __init__(self) -> None:
        self.own: dict[str, float] = defaultdict(float)
        self.ops: dict[str, dict[str, list[float]]] = defaultdict(dict)

    def walk(self, event: Any, group: str) -> float:
        """Attribute ``event``'s descendants; returns the time of the phase ranges among them."""
        nested = 0.0
        for child in event.cpu_children:
            name = child.name
            if name.startswith(PHASE_MARK):
                phase = name[len(PHASE_MARK) :]
                total = float(child.cpu_time_total)
                self.own[phase] += total - self.walk(child, phase)
                nested += total
            else:
                entry = self.ops[group].setdefault(name, [0.0, 0.0])
                entry[0] += 1
                entry[1] += float(child.self_cpu_time_total)
                nested += self.walk(child, group)
        return nested


def summarise_profile(
    events: Sequence[Any],
    kinds: Sequence[str],
    freq: Mapping[str, float],
    top: int = TOP_OPS,
) -> dict[str, Any]:
    """Operator profile per group, per step amortised over the step kinds.

    Args:
        events: The profiler's events (``prof.events()``): objects with ``name``,
            ``cpu_children``, ``cpu_time_total``, ``self_cpu_time_total`` (µs) and
            ``time_range.start``.
        kinds: Kind of each profiled step (:func:`~precond.bench.measure.step_kind`), in the
            order they ran; one :data:`STEP_MARK` range per step.
        freq: Frequencies of the step kinds (:func:`~precond.bench.measure.schedule_frequencies`);
            kinds not profiled are left out, and without any the kinds count as observed.
        top: Operators listed per group.

    Returns:
        ``{"steps": {kind: n}, "groups": {group: {"ms", "ops_ms", "python_ms",
        "other_ops_ms", "ops": [[name, calls per step, self ms per step], ...]}}}``; a group's
        ``ms`` is its own time, ``ops_ms`` the self time of its operators and ``python_ms`` the
        difference (never below 0). Each figure is the median over the profiled steps of a
        kind, weighted by the kinds' frequencies.

    Raises:
        ValueError: If the number of step ranges differs from the number of kinds.
    """
    steps = sorted((e for e in events if e.name == STEP_MARK), key=lambda e: e.time_range.start)
    if len(steps) != len(kinds):
        raise ValueError(
            f"Invalid kinds: {len(kinds)} for {len(steps)} profiled steps; one per step is needed."
        )
    by_kind: dict[str, list[_Step]] = defaultdict(list)
    for event, kind in zip(steps, kinds):
        step = _Step()
        step.own["rest"] += float(event.cpu_time_total) - step.walk(event, "rest")
        by_kind[kind].append(step)
    weights = {k: float(f) for k, f in freq.items() if k in by_kind and f > 0}
    if not weights:
        weights = {k: float(len(v)) for k, v in by_kind.items()}
    total = sum(weights.values()) or 1.0
    weights = {k: w / total for k, w in weights.items()}
    present = {g for k in weights for s in by_kind[k] for g in s.own}
    names = [g for g in GROUPS if g in present] + sorted(present - set(GROUPS))
    groups: dict[str, Any] = {}
    for group in names:
        own = 0.0
        ops: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for kind, w in weights.items():
            runs = by_kind[kind]
            own += w * median([s.own.get(group, 0.0) for s in runs])
            seen = {name for s in runs for name in s.ops.get(group, {})}
            for name in seen:
                per_step = [s.ops.get(group, {}).get(name, [0.0, 0.0]) for s in runs]
                ops[name][0] += w * median([c for c, _ in per_step])
                ops[name][1] += w * median([t for _, t in per_step])
        ranked = sorted(ops.items(), key=lambda item: -item[1][1])
        ops_us = sum(v[1] for _, v in ranked)
        groups[group] = {
            "ms": own / 1e3,
            "ops_ms": ops_us / 1e3,
            "python_ms": max(0.0, own - ops_us) / 1e3,
            "other_ops_ms": sum(v[1] for _, v in ranked[top:]) / 1e3,
            "ops": [[name, round(v[0], 2), v[1] / 1e3] for name, v in ranked[:top]],
        }
    counts = {k: len(v) for k, v in by_kind.items()}
    return {"steps": dict(counts), "groups": groups}
