r"""The cost floor: what a method's math costs at best on this machine.

For a method with curvature interval :math:`T_c` and refresh interval :math:`T_r`, the floor of
one training step is

.. math::

    t_\text{floor} = t_\text{SGD} + t_\text{apply}
        + \frac{t_\text{extra backward} + t_\text{curvature}}{T_c}
        + \frac{t_\text{refresh}}{T_r},

where :math:`t_\text{SGD}` is a measured SGD step (forward, backward, optimizer) of the same
model and batch, and each other term sums the kernels that the method's
:class:`~precond.methods.cost.CostModel` lists for that phase, timed alone at the same shapes
on the same machine (``count`` times each; every worker times its own, and
:func:`pool_kernel_timings` prices each kernel at a low quantile of the run's workers' timings,
:data:`KERNEL_QUANTILE`). Extra
backward passes cost the measured time of a back-propagation from the logits to every layer's
output (no weight gradients), once per pass (``-1`` passes mean one per class);
Hessian-vector products cost a measured double-backward pass each; gradient passes a full
backward (see :func:`pass_name`). These rates are timed through one retained graph, again
and again; the first pass of each kind in a phase is priced instead at what it adds to a
forward and backward pass when it follows them on a new graph (at least the retained rate;
:func:`~precond.bench.measure.in_step_passes`, :func:`first_pass_name`): that is where a
training step runs it, and a Hessian-vector product needs that backward to build the
gradient's graph. Nothing an implementation does can be cheaper, so ``floor / measured``
(the efficiency) is at most about 1.

The memory floor is SGD's measured peak plus the state the method must keep
(``state_numel``) and the transient buffers it must hold at once (``transient_numel``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..methods.cost import CostModel, KernelOp, Phase
from .kernels import kernel_key

__all__ = [
    "FLOOR_PHASES",
    "FACTORISATION_KINDS",
    "KERNEL_QUANTILE",
    "PASS_KINDS",
    "PhaseCosts",
    "amortised_floor",
    "first_pass_name",
    "in_step_name",
    "kernel_slowdown",
    "memory_floor_mb",
    "numel_mb",
    "pass_name",
    "phase_costs",
    "pool_kernel_timings",
    "quantile",
    "reference_kernel_ms",
]

#: Cost-model kinds measured as passes through the model (not timed as kernels; no key).
PASS_KINDS = ("backward", "hvp", "forward", "grad")

#: Phases of a step in reports: forward-backward (an SGD step) and the method's four phases.
FLOOR_PHASES = ("fb", "extra_backward", "curvature", "refresh", "apply")

_MB = 1024.0 * 1024.0


@dataclass
class PhaseCosts:
    """Floor milliseconds per occurrence of each phase.

    Attributes:
        ms: ``{phase: ms}`` for ``extra_backward``, ``curvature``, ``refresh``, ``apply``.
        kernels: One entry per kernel: phase, kind, shape, count and milliseconds (all counts).
        unknown: Kernel kinds that could not be timed (left out of the floor).
    """

    ms: dict[str, float] = field(default_factory=dict)
    kernels: list[dict[str, object]] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def phase_costs(
    cost: CostModel,
    kernel_ms: Callable[[KernelOp], float],
    *,
    backward_ms: float,
    hvp_ms: float,
    num_classes: int,
    forward_ms: float = 0.0,
    grad_ms: float = 0.0,
    first_ms: Mapping[str, float] | None = None,
) -> PhaseCosts:
    """Sum a cost model's kernels per phase.

    Args:
        cost: The method's cost model.
        kernel_ms: Milliseconds of one run of a kernel (raises ``ValueError`` for unknown kinds).
        backward_ms: Milliseconds of one extra backward pass through the model.
        hvp_ms: Milliseconds of one Hessian-vector product through the model.
        num_classes: Passes of a ``backward`` op with count ``-1`` (one per class).
        forward_ms: Milliseconds of one extra forward pass through the model (graph built).
        grad_ms: Milliseconds of one extra gradient of a loss w.r.t. all parameters.
        first_ms: Per pass kind, milliseconds of the first such pass of a phase, which runs
            after the step's own forward and backward on a new graph
            (:func:`~precond.bench.measure.in_step_passes`); the further passes of the phase
            cost the rates above. Kinds left out cost the rates above throughout.

    Returns:
        The per-phase costs.
    """
    out = PhaseCosts(ms={str(p): 0.0 for p in Phase})
    first_ms = first_ms or {}
    for op in cost.ops:
        split: dict[str, float] = {}
        if op.kind in PASS_KINDS:
            passes = op.shape[0] if op.shape else 1
            passes = num_classes if passes < 0 else passes
            rates = {"backward": backward_ms, "hvp": hvp_ms, "forward": forward_ms, "grad": grad_ms}
            per = rates[op.kind]
            total = passes * op.count
            first = first_ms.get(op.kind)
            if first is not None and total > 0:
                # the in-step price of the first pass, at least the retained graph's
                split = {"first": max(first, per), "more": per * (total - 1)}
                ms = split["first"] + split["more"]
            else:
                ms = per * total
        else:
            try:
                ms = kernel_ms(op) * op.count
            except ValueError:
                out.unknown.append(op.kind)
                continue
        phase = str(op.phase)
        out.ms[phase] = out.ms.get(phase, 0.0) + ms
        out.kernels.append(
            {
                "phase": phase,
                "kind": op.kind,
                "shape": list(op.shape),
                "count": op.count,
                "ms": ms,
                **(
                    ({"pass_split_ms": split} if split else {})
                    if op.kind in PASS_KINDS
                    else {"key": kernel_key(op.kind, op.shape, op.dtype)}
                ),
            }
        )
    return out


def pool_kernel_timings(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Give every row's floor the run's reference time of each kernel (in place).

    Each worker times the kernels of its own floor. The host has stretches of seconds to
    minutes in which some kernels run slower with no other process on the cores (every kernel
    2-3 × for a while; multithreaded LAPACK at one thread's speed while matrix products keep
    theirs), so one worker's timing would set the floor of its configuration alone, and in a
    run spent mostly in such stretches even the median over the workers lands on the slow
    mode (a K-FAC refresh priced at 20.8 ms against 13.5 in other runs, and an efficiency of
    1.21 for a worker that ran in the fast mode). The reference is the
    :data:`KERNEL_QUANTILE` quantile over all workers that timed the kernel
    (:func:`reference_kernel_ms`): the rate the machine reaches when nothing slows it, which
    one lucky timing cannot set either. Each row keeps its own worker's timing of a kernel as
    ``worker_ms``, and its per-phase floor ``floor_costs_ms`` is re-summed with the pooled
    times.

    Args:
        rows: Rows of a run (``floor_kernels`` entries with a ``key``; others are left alone).

    Returns:
        ``{kernel_key: ms}``: the reference milliseconds of one run of each kernel.
    """
    for row in rows:  # passes already pooled (or keyed by an older rule): the worker's own
        costs = row.get("floor_costs_ms")
        for k in row.get("floor_kernels") or []:
            if k.get("kind") in PASS_KINDS and "worker_ms" in k and costs is not None:
                costs[k["phase"]] += float(k["worker_ms"]) - float(k["ms"])
                k["ms"] = float(k.pop("worker_ms"))
                k.pop("key", None)
                if "worker_pass_split_ms" in k:
                    k["pass_split_ms"] = k.pop("worker_pass_split_ms")
    _pool_passes(rows)
    pooled = reference_kernel_ms(rows)
    for row in rows:
        costs = row.get("floor_costs_ms")
        if row.get("status") != "ok" or costs is None:
            continue
        for k in row.get("floor_kernels") or []:
            count = k.get("count") or 0
            if k.get("key") not in pooled or k.get("kind") in PASS_KINDS or count <= 0:
                continue
            own_ms = float(k.get("worker_ms", k["ms"]))
            new = pooled[k["key"]] * count
            costs[k["phase"]] = costs.get(k["phase"], 0.0) + new - float(k["ms"])
            k["worker_ms"], k["ms"] = own_ms, new
    return pooled


def _own_kernels(row: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], float]]:
    """A row's keyed floor kernels with the worker's own milliseconds per run of each."""
    for k in row.get("floor_kernels") or []:
        count = k.get("count") or 0
        if k.get("key") and k.get("kind") not in PASS_KINDS and count > 0:
            yield k, float(k.get("worker_ms", k["ms"])) / count


#: Quantile of the workers' timings of a kernel that prices it in the floor (see
#: :func:`pool_kernel_timings`). Against the median, in the runs at 7f5abf7 and 0280402 (the
#: second mostly in the host's slow stretches): 233 and 232 configurations at efficiency
#: ≥ 0.8 with the median, 232 and 221 with this quantile, 227 and 211 with the minimum.
KERNEL_QUANTILE = 0.25


def reference_kernel_ms(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Per kernel key, the :data:`KERNEL_QUANTILE` quantile over the ``ok`` rows' workers.

    Reads each worker's own timing of one run of the kernel (``worker_ms`` once pooled, else
    ``ms``) and changes nothing; a worker counts once per kernel, however often its model uses
    it. The quantile interpolates linearly between the sorted timings (one timing is its own
    reference).
    """
    samples: dict[str, list[float]] = {}
    for row in rows:
        if row.get("status") != "ok":
            continue
        own = {k["key"]: ms for k, ms in _own_kernels(row)}
        for key, ms in own.items():
            samples.setdefault(key, []).append(ms)
    return {key: quantile(v, KERNEL_QUANTILE) for key, v in samples.items()}


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (percent steps, linear between sorted values)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(100 * q) - 1]


#: Kernel kinds that LAPACK runs (factorisations). The host has stretches in which these run
#: at about one thread's speed while matrix products keep theirs (see
#: :data:`precond.bench.runner.KERNEL_SLOW_LIMIT`), so a worker's slowdown is also judged over
#: them alone: among a floor's matrix products their slowdown is diluted.
FACTORISATION_KINDS = ("cholesky", "cholesky_inverse", "eigh", "eigvalsh", "qr")


def kernel_slowdown(
    row: Mapping[str, Any],
    reference: Mapping[str, float],
    kinds: Iterable[str] | None = None,
) -> tuple[float, float] | None:
    """How much slower a worker timed its floor's kernels than the run's reference.

    Both sides are amortised per step like the floor (every phase but ``apply`` divided by the
    row's interval), so a slow factorisation at ``T = 100`` weighs a hundredth.

    Args:
        row: A measured row (its ``floor_kernels`` with the worker's own timings).
        reference: ``{kernel_key: ms}`` per run of each kernel (:func:`reference_kernel_ms`).
        kinds: Only the kernels of these kinds (default: all), e.g.
            :data:`FACTORISATION_KINDS`.

    Returns:
        ``(own / reference, reference ms per step)`` over the kernels that have a reference,
        or ``None`` if there are none (or the row failed).
    """
    if row.get("status") != "ok":
        return None
    interval = max(int(row.get("interval") or 1), 1)
    own = ref = 0.0
    only = None if kinds is None else set(kinds)
    for k, ms in _own_kernels(row):
        if k["key"] not in reference or (only is not None and k.get("kind") not in only):
            continue
        per_step = float(k["count"]) / (1 if k.get("phase") == "apply" else interval)
        own += ms * per_step
        ref += reference[k["key"]] * per_step
    return (own / ref, ref) if ref > 0 else None


def amortised_floor(
    sgd_ms: float,
    costs: Mapping[str, float],
    curvature_interval: int,
    refresh_interval: int | None = None,
) -> dict[str, float]:
    """The floor of one step, per phase and in total, amortised over the intervals.

    Args:
        sgd_ms: Measured SGD step (the ``fb`` phase of the floor).
        costs: Milliseconds per occurrence of ``extra_backward``, ``curvature``, ``refresh``,
            ``apply`` (missing phases cost nothing).
        curvature_interval: Steps between curvature updates ``T_c``.
        refresh_interval: Steps between preconditioner refreshes ``T_r`` (default ``T_c``).

    Returns:
        ``{phase: ms}`` for :data:`FLOOR_PHASES` plus ``"total"``.
    """
    tc = max(int(curvature_interval), 1)
    tr = max(int(refresh_interval if refresh_interval is not None else tc), 1)
    floor = {
        "fb": float(sgd_ms),
        "extra_backward": costs.get("extra_backward", 0.0) / tc,
        "curvature": costs.get("curvature", 0.0) / tc,
        "refresh": costs.get("refresh", 0.0) / tr,
        "apply": costs.get("apply", 0.0),
    }
    floor["total"] = sum(floor[p] for p in FLOOR_PHASES)
    return floor


def numel_mb(numel: int, dtype: torch.dtype = torch.float32) -> float:
    """Megabytes of ``numel`` elements of ``dtype``."""
    return int(numel) * torch.empty((), dtype=dtype).element_size() / _MB


def memory_floor_mb(sgd_peak_mb: float, state_mb: float = 0.0, transient_mb: float = 0.0) -> float:
    """SGD's peak plus the state and transient buffers the method's math needs.

    Args:
        sgd_peak_mb: Measured peak of the SGD configuration.
        state_mb: Persistent state (factors, inverses, roots, statistics).
        transient_mb: Buffers alive at once during a step beyond SGD's.

    Returns:
        The memory floor in MB.
    """
    return float(sgd_peak_mb) + float(state_mb) + float(transient_mb)


def pass_name(kind: str, passes: Mapping[str, float]) -> str:
    """The measured pass (``passes_ms`` key) a cost-model pass kind is priced with.

    ``backward``: a back-propagation to the layers' outputs (``vector_backward`` where
    measured, else the full ``backward``); ``grad``: the full ``backward``; ``hvp`` and
    ``forward``: themselves.
    """
    if kind == "backward":
        return "vector_backward" if "vector_backward" in passes else "backward"
    return {"grad": "backward"}.get(kind, kind)


def in_step_name(kind: str, vector_backward: bool) -> str | None:
    """The in-step pass (:func:`~precond.bench.measure.in_step_passes`) of a pass kind, if any.

    ``backward`` is a back-propagation to the layers' outputs where that is measured
    (``vector_backward``), else a full gradient; ``grad`` is ``grad_in_step``, ``hvp`` is
    ``hvp_in_step``; ``forward`` has none.
    """
    if kind == "backward":
        return "vector_backward_in_step" if vector_backward else "grad_in_step"
    return {"grad": "grad_in_step", "hvp": "hvp_in_step"}.get(kind)


def first_pass_name(kind: str, passes: Mapping[str, float]) -> str | None:
    """The measured pass that prices the first pass of ``kind`` in a phase, if measured.

    :func:`in_step_name`, when ``passes`` has it (``None``: priced like the further passes).
    """
    name = in_step_name(kind, "vector_backward" in passes)
    return name if name is not None and name in passes else None


def _pool_passes(rows: list[dict[str, Any]]) -> None:
    """Price the passes through the model at their median over the run's workers.

    Backward, Hessian-vector and forward passes are measured in each worker on its model and
    batch; like a kernel timing, one worker's measurement can be 2 × another's. Per model and
    batch size, each pass's median over the workers replaces the worker's own in the floor
    (scaled per entry; the own value stays in ``worker_passes_ms``).
    """
    samples: dict[tuple[Any, Any, str], list[float]] = {}
    for row in rows:
        if row.get("status") != "ok" or not row.get("passes_ms"):
            continue
        own = row.setdefault("worker_passes_ms", dict(row["passes_ms"]))
        for name, ms in own.items():
            samples.setdefault((row.get("model"), row.get("batch_size"), name), []).append(ms)
    pooled = {key: statistics.median(v) for key, v in samples.items()}
    for row in rows:
        costs, own = row.get("floor_costs_ms"), row.get("worker_passes_ms")
        if row.get("status") != "ok" or costs is None or not own:
            continue
        row["passes_ms"] = {
            name: pooled[(row.get("model"), row.get("batch_size"), name)] for name in own
        }
        pooled_row = row["passes_ms"]
        for k in row.get("floor_kernels") or []:
            if k.get("kind") not in PASS_KINDS:
                continue
            name = pass_name(k["kind"], own)
            if not own.get(name):
                continue
            split = k.get("pass_split_ms")
            first = first_pass_name(k["kind"], own)
            if split and first is not None:
                # the first pass at the pooled in-step price (at least the retained one)
                new_split = {
                    "first": max(pooled_row[first], pooled_row[name]),
                    "more": float(split["more"]) * pooled_row[name] / own[name],
                }
                new = new_split["first"] + new_split["more"]
                k["worker_pass_split_ms"], k["pass_split_ms"] = split, new_split
            else:
                new = float(k["ms"]) * pooled_row[name] / own[name]
            costs[k["phase"]] = costs.get(k["phase"], 0.0) + new - float(k["ms"])
            k["worker_ms"], k["ms"] = float(k["ms"]), new
