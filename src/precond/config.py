"""Configuration shared by every gradient maker.

Method configs (``KfacConfig``, ``ShampooConfig``, ...) subclass :class:`PreconditioningConfig`
and add their own knobs; every field is validated in ``__post_init__`` so that bad input fails
at construction with ``Invalid <name>: <value>. <what is allowed>.``

Scaling convention: curvature is that of the loss *as written* (``mean`` reduction gives the
average over the batch, ``sum`` the sum). The preconditioner inverts ``C + (damping / data_size) I``
where ``data_size`` defaults to 1: with ``data_size`` set to the number of training examples and a
``mean`` loss, ``damping`` acts as the precision of a Gaussian prior on the parameters of the
summed full-data objective (see ``docs/conventions.md``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .enums import UnsupportedPolicy
from .schedule import IntervalType, Schedule
from .validation import check_float, check_int, check_probability, coerce_enum, invalid

__all__ = [
    "IgnoreSpec",
    "PreconditioningConfig",
    "matches_with_ancestors",
    "module_specs",
    "spec_matches",
]

IgnoreSpec = nn.Module | type | str


def module_specs(name: str, value: Any) -> tuple[IgnoreSpec, ...]:
    """Validate a list of module specs: module objects, ``nn.Module`` classes or name globs.

    Args:
        name: The config field, for errors.
        value: One spec or a sequence of them.

    Returns:
        The specs as a tuple.

    Raises:
        ValueError: For anything else.
    """
    if isinstance(value, str | nn.Module | type):
        value = (value,)
    if not isinstance(value, Sequence):
        raise invalid(name, value, "Must be a sequence of modules, module classes or name patterns")
    for spec in value:
        if not (
            isinstance(spec, str | nn.Module)
            or (isinstance(spec, type) and issubclass(spec, nn.Module))
        ):
            raise invalid(
                name,
                spec,
                "Entries must be nn.Module objects, nn.Module subclasses or name patterns",
            )
    return tuple(value)


def spec_matches(specs: Sequence[IgnoreSpec], name: str, module: nn.Module) -> bool:
    """Whether ``module`` (qualified name ``name``) matches any spec.

    Args:
        specs: Module objects, classes or ``fnmatch`` name patterns.
        name: Qualified module name.
        module: The module.

    Returns:
        ``True`` on a match.
    """
    for spec in specs:
        if isinstance(spec, str):
            if name == spec or fnmatch.fnmatchcase(name, spec):
                return True
        elif isinstance(spec, type):
            if isinstance(module, spec):
                return True
        elif spec is module:
            return True
    return False


def matches_with_ancestors(specs: Sequence[IgnoreSpec], model: nn.Module, name: str) -> bool:
    """Whether module ``name`` of ``model`` or any of its ancestors matches a spec.

    Args:
        specs: Module specs.
        model: The root module.
        name: Qualified name of the module.

    Returns:
        ``True`` on a match.
    """
    parts = name.split(".") if name else []
    for i in range(len(parts) + 1):
        prefix = ".".join(parts[:i])
        if spec_matches(specs, prefix, model.get_submodule(prefix) if prefix else model):
            return True
    return False


@dataclass(kw_only=True)
class PreconditioningConfig:
    """Knobs common to all preconditioners.

    Args:
        damping: Tikhonov damping ``λ ≥ 0`` added to the curvature before it is inverted
            (methods document how they split or use it).
        data_size: Number of examples of the full training set, or ``None``. The damping applied
            is ``damping / data_size``.
        curvature_upd_interval: Steps between curvature (statistics) updates after warm-up.
        curvature_warmup_steps: Initial steps that update the curvature every step.
        curvature_upd_ratio: Alternative to the interval: fraction of ``num_total_steps`` that
            update the curvature.
        preconditioner_upd_interval: Steps between preconditioner refreshes (inverses,
            eigendecompositions). ``None`` follows the curvature schedule.
        preconditioner_warmup_steps: Initial steps that refresh the preconditioner every step.
        preconditioner_upd_ratio: Fraction of ``num_total_steps`` that refresh the preconditioner.
        num_total_steps: Planned number of steps (needed by ratio schedules).
        interval_type: Spacing of ratio schedules: ``"constant"`` or ``"linear"`` (growing gaps).
        ema_decay: Exponential moving average of curvature statistics,
            ``C ← decay · C + (1 − decay) · C_batch``; 0 keeps only the latest batch.
        ignore_modules: Modules whose parameters keep their plain gradient: module objects,
            module classes, or qualified-name patterns (``fnmatch`` globs such as ``"head.*"``).
        unsupported: What to do with modules the method cannot handle: ``"error"`` (default),
            ``"skip"`` (plain gradient) or ``"diag"`` (a diagonal second-moment fallback).
        seed: Seed of the gradient maker's own random generator (Monte-Carlo labels, random
            probes). ``None`` draws it from ``torch.initial_seed()``.
    """

    damping: float = 1e-3
    data_size: int | None = None
    curvature_upd_interval: int = 1
    curvature_warmup_steps: int = 0
    curvature_upd_ratio: float | None = None
    preconditioner_upd_interval: int | None = None
    preconditioner_warmup_steps: int = 0
    preconditioner_upd_ratio: float | None = None
    num_total_steps: int | None = None
    interval_type: IntervalType | str = IntervalType.CONSTANT
    ema_decay: float = 0.0
    ignore_modules: Sequence[IgnoreSpec] = field(default_factory=tuple)
    unsupported: UnsupportedPolicy | str = UnsupportedPolicy.ERROR
    seed: int | None = None

    def __post_init__(self) -> None:
        check_float("damping", self.damping, minimum=0.0)
        if self.data_size is not None:
            check_int("data_size", self.data_size, minimum=1)
        check_probability("ema_decay", self.ema_decay)
        self.unsupported = coerce_enum(UnsupportedPolicy, self.unsupported, "unsupported")
        self.interval_type = coerce_enum(IntervalType, self.interval_type, "interval_type")
        if self.num_total_steps is not None:
            check_int("num_total_steps", self.num_total_steps, minimum=1)
        if self.seed is not None:
            check_int("seed", self.seed, minimum=0)
        self.ignore_modules = module_specs("ignore_modules", self.ignore_modules)
        # Building the schedules validates their fields.
        self.curvature_schedule()
        self.preconditioner_schedule()

    @property
    def effective_damping(self) -> float:
        """The damping added to the curvature: ``damping / data_size``."""
        return self.damping / (self.data_size or 1)

    def curvature_schedule(self) -> Schedule:
        """The schedule of curvature updates.

        Returns:
            The curvature :class:`~precond.schedule.Schedule`.
        """
        return Schedule(
            interval=self.curvature_upd_interval,
            warmup_steps=self.curvature_warmup_steps,
            ratio=self.curvature_upd_ratio,
            num_total_steps=self.num_total_steps,
            interval_type=IntervalType(self.interval_type),
            name="curvature",
        )

    def preconditioner_schedule(self) -> Schedule:
        """The schedule of preconditioner refreshes (the curvature's unless set).

        Returns:
            The preconditioner :class:`~precond.schedule.Schedule`.
        """
        if (
            self.preconditioner_upd_interval is None
            and self.preconditioner_upd_ratio is None
            and self.preconditioner_warmup_steps == 0
        ):
            return self.curvature_schedule()
        return Schedule(
            interval=1
            if self.preconditioner_upd_interval is None
            else self.preconditioner_upd_interval,
            warmup_steps=self.preconditioner_warmup_steps,
            ratio=self.preconditioner_upd_ratio,
            num_total_steps=self.num_total_steps,
            interval_type=IntervalType(self.interval_type),
            name="preconditioner",
        )

    def is_ignored(self, name: str, module: nn.Module) -> bool:
        """Whether ``module`` (qualified name ``name``) is excluded by ``ignore_modules``.

        Args:
            name: Qualified module name (``"encoder.layers.0.fc"``).
            module: The module.

        Returns:
            ``True`` if any entry of ``ignore_modules`` matches.
        """
        return spec_matches(self.ignore_modules, name, module)

    def replace(self, **changes: Any) -> PreconditioningConfig:
        """Return a copy with some fields changed (validated again).

        Args:
            **changes: Field values to change.

        Returns:
            The new config.
        """
        import dataclasses

        return dataclasses.replace(self, **changes)
