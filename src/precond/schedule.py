"""When curvature and preconditioner updates happen.

A :class:`Schedule` answers one question, ``is_update_step(step)``, for a 0-based step count.
Two families exist:

* **interval** (default): every step during ``warmup_steps``, then every ``interval``-th step
  counted from the end of the warm-up (the first step after warm-up always updates).
* **ratio**: over a run of ``num_total_steps`` steps, ``round(ratio * num_total_steps)`` updates
  (at least one) of which the first ``warmup_steps`` are the first steps; the rest are spread
  over the remaining steps with constant gaps (``interval_type="constant"``) or with gaps that
  grow linearly (``"linear"``: frequent updates early, rare ones late). Past ``num_total_steps``
  the last gap repeats, so a run that is longer than planned keeps updating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from .validation import check_float, check_int, coerce_enum, invalid

__all__ = ["IntervalType", "Schedule"]


class IntervalType(str, Enum):
    """Spacing of the updates of a ratio schedule."""

    CONSTANT = "constant"
    LINEAR = "linear"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """An update schedule.

    Args:
        interval: Steps between updates after warm-up (interval schedules).
        warmup_steps: Initial steps that all update.
        ratio: Fraction of ``num_total_steps`` that update (ratio schedules); ``None`` selects the
            interval family.
        num_total_steps: Planned length of the run; required by ratio schedules.
        interval_type: Spacing of a ratio schedule's updates.
        name: Prefix for error messages (``"curvature"`` or ``"preconditioner"``).
    """

    interval: int = 1
    warmup_steps: int = 0
    ratio: float | None = None
    num_total_steps: int | None = None
    interval_type: IntervalType = IntervalType.CONSTANT
    name: str = "curvature"
    _positions: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)
    _position_set: frozenset[int] = field(
        default=frozenset(), init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        check_int(f"{self.name}_upd_interval", self.interval, minimum=1)
        check_int(f"{self.name}_warmup_steps", self.warmup_steps, minimum=0)
        object.__setattr__(
            self, "interval_type", coerce_enum(IntervalType, self.interval_type, "interval_type")
        )
        if self.ratio is None:
            return
        check_float(f"{self.name}_upd_ratio", self.ratio, minimum=0.0, maximum=1.0, strict_min=True)
        if self.num_total_steps is None:
            raise invalid(
                "num_total_steps",
                None,
                f"{self.name}_upd_ratio={self.ratio} needs the planned number of steps; "
                "pass num_total_steps=<int>",
            )
        check_int("num_total_steps", self.num_total_steps, minimum=1)
        if self.interval != 1:
            raise invalid(
                f"{self.name}_upd_interval",
                self.interval,
                f"Cannot be combined with {self.name}_upd_ratio={self.ratio}; "
                "give either an interval or a ratio",
            )
        num_updates = max(1, round(self.ratio * self.num_total_steps))
        if self.warmup_steps > num_updates:
            raise invalid(
                f"{self.name}_warmup_steps",
                self.warmup_steps,
                f"Must be <= the number of updates of the ratio schedule ({num_updates})",
            )
        positions = self._ratio_positions(num_updates)
        object.__setattr__(self, "_positions", positions)
        object.__setattr__(self, "_position_set", frozenset(positions))

    def _ratio_positions(self, num_updates: int) -> tuple[int, ...]:
        total = self.num_total_steps
        assert total is not None
        warm = self.warmup_steps
        positions = list(range(warm))
        rest, span = num_updates - warm, total - warm
        for i in range(rest):
            frac = i / rest
            if self.interval_type is IntervalType.LINEAR:
                frac = frac * frac
            pos = warm + math.floor(span * frac)
            if positions and pos <= positions[-1]:
                pos = positions[-1] + 1
            positions.append(pos)
        return tuple(positions)

    def is_update_step(self, step: int) -> bool:
        """Whether step ``step`` (0-based) performs an update.

        Args:
            step: The number of completed steps before this one.

        Returns:
            ``True`` if this step updates.
        """
        if step < self.warmup_steps:
            return True
        if self.ratio is None:
            return (step - self.warmup_steps) % self.interval == 0
        positions = self._positions
        total = self.num_total_steps
        assert total is not None
        if step < total:
            return step in self._position_set
        gap = positions[-1] - positions[-2] if len(positions) > 1 else total
        return (step - positions[-1]) % max(gap, 1) == 0

    def num_updates(self, num_steps: int) -> int:
        """Count the updates among the first ``num_steps`` steps.

        Args:
            num_steps: Number of steps.

        Returns:
            The number of update steps.
        """
        return sum(self.is_update_step(s) for s in range(num_steps))
