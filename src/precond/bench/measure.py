"""Measuring training steps of one gradient maker: time per step and per phase.

The methods are not modified: :class:`PhaseTimer` wraps the bound methods of one gradient maker
instance (``_curvature_backward``, ``update_curvature``, ``update_preconditioner``,
``precondition``, ``_backward`` and the diagonal fallback's ``update``/``precondition``) with
timers. On a CPU the timers cost a ``perf_counter`` call each, so phases are read from the same
steps as the headline time; on CUDA they synchronise the device, so only a separate "profiled"
pass uses them and the headline comes from unsynchronised steps.

Steps are classified by the work they did (``idle``: neither curvature nor preconditioner
updated, ``update``: both, or ``curvature``/``refresh`` alone). The amortised time of a step is
``Σ_kind freq(kind) · median(kind)``, where the frequencies come from the method's schedules,
so a T=100 configuration needs a handful of update steps rather than many full cycles.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from .floor import in_step_name

__all__ = [
    "FALLBACK_METHODS",
    "MEASURED_PHASES",
    "PHASE_MARK",
    "PHASE_METHODS",
    "PhaseTimer",
    "StepSample",
    "run_steps",
    "schedule_frequencies",
    "summarise",
]

#: Phases reported per step (``fb`` is the rest of the step: forward, backward, optimizer).
MEASURED_PHASES = ("fb", "extra_backward", "curvature", "refresh", "apply")

#: Methods of a gradient maker that :class:`PhaseTimer` wraps, and their phases.
PHASE_METHODS = {
    "_curvature_backward": "extra_backward",
    "update_curvature": "curvature",
    "update_preconditioner": "refresh",
    "precondition": "apply",
    "_backward": "backward",
}
#: The same for the diagonal fallback of layers without an adapter.
FALLBACK_METHODS = {"update": "curvature", "precondition": "apply"}

#: Prefix of the profiler ranges of marked phases (``"precond::apply"``) and steps.
PHASE_MARK = "precond::"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_kind(curvature: bool, refresh: bool) -> str:
    """Name of a step kind: ``update``, ``curvature``, ``refresh`` or ``idle``."""
    if curvature and refresh:
        return "update"
    if curvature:
        return "curvature"
    return "refresh" if refresh else "idle"


class PhaseTimer:
    """Times the phases of one gradient maker's steps.

    Args:
        gm: The gradient maker (its bound methods are replaced by timed wrappers).
        device: Device (synchronised around each phase when ``sync`` is set).
        sync: Synchronise the device around each phase (CUDA profiled pass).
        mark: Run each phase inside a profiler range named ``PHASE_MARK + phase`` (the
            operator profile of :mod:`precond.bench.profile`).
    """

    def __init__(
        self, gm: Any, device: torch.device, sync: bool = False, mark: bool = False
    ) -> None:
        self.device = device
        self.sync = sync
        self.mark = mark
        self.acc: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        for attr, phase in PHASE_METHODS.items():
            fn = getattr(gm, attr, None)
            if callable(fn):
                setattr(gm, attr, self._wrap(fn, phase, attr))
        fallback = getattr(gm, "fallback", None)
        if fallback is not None:
            for attr, phase in FALLBACK_METHODS.items():
                fn = getattr(fallback, attr, None)
                if callable(fn):
                    setattr(fallback, attr, self._wrap(fn, phase, f"fallback.{attr}"))

    def _wrap(self, fn: Callable[..., Any], phase: str, name: str) -> Callable[..., Any]:
        label = PHASE_MARK + phase

        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.sync:
                _sync(self.device)
            t0 = time.perf_counter()
            try:
                if self.mark:
                    with record_function(label):
                        return fn(*args, **kwargs)
                return fn(*args, **kwargs)
            finally:
                if self.sync:
                    _sync(self.device)
                self.acc[phase] += time.perf_counter() - t0
                self.calls[name] += 1

        return timed

    def begin_step(self) -> None:
        """Forget the previous step's phases."""
        self.acc.clear()
        self.calls.clear()

    def kind(self) -> str:
        """Kind of the step just run."""
        return step_kind(
            self.calls["update_curvature"] > 0, self.calls["update_preconditioner"] > 0
        )


@dataclass
class StepSample:
    """One timed step.

    Attributes:
        kind: Step kind (see :func:`step_kind`).
        seconds: Wall-clock time of the whole step.
        phases: Seconds per wrapped phase (``extra_backward``, ``curvature``, ``refresh``,
            ``apply``, ``backward``).
    """

    kind: str
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)


def schedule_frequencies(gm: Any, start: int = 0) -> dict[str, float]:
    """Long-run fraction of steps of each kind, from the gradient maker's schedules.

    Args:
        gm: The gradient maker (without schedules every step is ``idle``).
        start: First step counted (past any warm-up).

    Returns:
        ``{kind: fraction}``.
    """
    cs = getattr(gm, "curvature_schedule", None)
    ps = getattr(gm, "preconditioner_schedule", None)
    if cs is None or ps is None:
        return {"idle": 1.0}
    period = math.lcm(int(getattr(cs, "interval", 1)), int(getattr(ps, "interval", 1)))
    begin = max(start, int(getattr(cs, "warmup_steps", 0)), int(getattr(ps, "warmup_steps", 0)))
    horizon = min(max(100 * period, 1000), 100_000)
    counts: Counter[str] = Counter(
        step_kind(cs.is_update_step(s), ps.is_update_step(s)) for s in range(begin, begin + horizon)
    )
    return {k: c / horizon for k, c in counts.items()}


def run_steps(
    step: Callable[[], None],
    timer: PhaseTimer,
    freq: Mapping[str, float],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    rare_repeats: int,
    max_steps: int,
    budget_s: float,
    min_time: float = 0.0,
    sample_time: float = 0.0,
    info: dict[str, Any] | None = None,
    fast_forward: Callable[[], int] | None = None,
) -> tuple[list[StepSample], int]:
    """Run warm-up steps, then timed steps until every kind has enough samples.

    The most frequent kind needs ``repeats`` samples, rarer kinds ``rare_repeats``; a kind
    whose samples add up to ``sample_time`` seconds needs only three (rarer kinds two), since
    the median of a few multi-second steps is as steady as that of many short ones. Past
    ``max_steps`` timed steps the run stops as soon as every kind has one sample; past
    ``budget_s`` seconds, or long after a predicted kind should have come, it stops regardless.
    Warm-up steps stop early once they add up to ``sample_time`` seconds (at least one runs).
    With ``fast_forward``, once the most frequent kind has enough samples and a rarer one has
    not, the steps until the next step of a rarer kind are skipped (at ``T = 100`` the update
    step comes after 7 idle samples instead of 97 identical idle steps).

    Args:
        step: One training step.
        timer: The phase timer installed on the gradient maker.
        freq: Kind frequencies (:func:`schedule_frequencies`).
        device: Device (synchronised at step boundaries).
        warmup: Untimed steps first.
        repeats: Samples of the most frequent kind.
        rare_repeats: Samples of the other kinds.
        max_steps: Timed steps after which one sample per kind is enough.
        budget_s: Seconds after which the run stops.
        min_time: Seconds of timed steps at least (more samples of fast steps: a steadier
            median, and a window long enough to tell whether other processes interfered).
        sample_time: Seconds of samples after which a kind needs fewer samples (0: never).
        info: If given, receives ``stop``: why the run stopped (``"samples"``: every kind has
            enough samples, ``"max_steps"``, ``"budget"``: the time budget ran out first,
            ``"missing"``: a predicted kind never came), and ``skipped``: the steps that
            ``fast_forward`` skipped.
        fast_forward: Advances the training to the next step of a rarer kind (the gradient
            maker's step counter; the steps in between would repeat the most frequent kind)
            and returns the number of steps skipped.

    Returns:
        The samples and the number of steps run (warm-up included).
    """
    warm_start = time.perf_counter()
    warm = 0
    for _ in range(warmup):
        step()
        warm += 1
        _sync(device)
        if 0 < sample_time <= time.perf_counter() - warm_start:
            break  # slow steps: the first ones warmed up code and allocator enough
    wanted = {k for k, f in freq.items() if f > 0}
    main = max(freq, key=lambda k: freq[k]) if freq else "idle"
    target = {k: (repeats if k == main else rare_repeats) for k in wanted}
    fewer = {k: min(target[k], 3 if k == main else 2) for k in wanted}
    rarest = min((f for f in freq.values() if f > 0), default=1.0)
    hard_max = max_steps + math.ceil(2 / rarest)  # kinds the schedules predict may never come
    samples: list[StepSample] = []
    counts: Counter[str] = Counter()
    seconds: dict[str, float] = defaultdict(float)
    start = time.perf_counter()
    steps = 0
    skipped = 0

    def enough(k: str) -> bool:
        if counts[k] >= target[k]:
            return True
        return sample_time > 0 and seconds[k] >= sample_time and counts[k] >= fewer[k]

    while True:
        timer.begin_step()
        t0 = time.perf_counter()
        step()
        _sync(device)
        dt = time.perf_counter() - t0
        kind = timer.kind()
        samples.append(StepSample(kind, dt, dict(timer.acc)))
        counts[kind] += 1
        seconds[kind] += dt
        steps += 1
        have_all = all(counts[k] >= 1 for k in wanted)
        elapsed = time.perf_counter() - start
        stop = None
        if all(enough(k) for k in wanted) and elapsed >= min_time:
            stop = "samples"
        elif steps >= max_steps and have_all and elapsed >= min_time:
            stop = "max_steps"
        elif steps >= hard_max and not have_all:
            stop = "missing"
        elif elapsed > budget_s:
            stop = "budget"
        if stop is not None:
            if info is not None:
                info["stop"] = stop
                info["skipped"] = skipped
            break
        if (
            fast_forward is not None
            and enough(main)
            and any(not enough(k) for k in wanted if k != main)
        ):
            skipped += fast_forward()
    return samples, warm + steps


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def summarise(
    samples: list[StepSample],
    freq: Mapping[str, float],
    *,
    backward_overridden: bool = False,
    plain_backward_s: float | None = None,
) -> dict[str, Any]:
    """Medians per kind and the amortised time and phases of a step, in milliseconds.

    Kinds that the schedules predict but the run did not sample are reported in ``missing``;
    the amortisation then uses the frequencies of the kinds that were sampled.

    Args:
        samples: Timed steps.
        freq: Kind frequencies.
        backward_overridden: The method overrides ``_backward`` (second-order backward passes):
            on non-idle steps its excess over a plain backward counts as ``extra_backward``.
        plain_backward_s: Seconds of a plain backward pass (used when no idle step is sampled).

    Returns:
        ``time_ms``, ``phases_ms`` (amortised), ``kinds`` (per kind: ``n``, ``time_ms``,
        ``phases_ms``), ``freq`` and ``missing``.
    """
    by_kind: dict[str, list[StepSample]] = defaultdict(list)
    for s in samples:
        by_kind[s.kind].append(s)
    idle_bwd = [s.phases.get("backward", 0.0) for s in by_kind.get("idle", [])]
    base_bwd = _median(idle_bwd) if idle_bwd else plain_backward_s
    kinds: dict[str, dict[str, Any]] = {}
    for kind, group in by_kind.items():
        per_phase: dict[str, list[float]] = defaultdict(list)
        for s in group:
            extra = s.phases.get("extra_backward", 0.0)
            if backward_overridden and kind != "idle" and base_bwd is not None:
                extra += max(0.0, s.phases.get("backward", 0.0) - base_bwd)
            parts = {
                "extra_backward": extra,
                "curvature": s.phases.get("curvature", 0.0),
                "refresh": s.phases.get("refresh", 0.0),
                "apply": s.phases.get("apply", 0.0),
            }
            parts["fb"] = max(0.0, s.seconds - sum(parts.values()))
            for p, v in parts.items():
                per_phase[p].append(v)
        kinds[kind] = {
            "n": len(group),
            "time_ms": 1e3 * _median([s.seconds for s in group]),
            "phases_ms": {p: 1e3 * _median(per_phase[p]) for p in MEASURED_PHASES},
        }
    missing = sorted(k for k, f in freq.items() if f > 0 and k not in kinds)
    weights = {k: f for k, f in freq.items() if k in kinds and f > 0}
    if not weights:  # the schedules do not describe what ran: weigh kinds as observed
        weights = {k: v["n"] for k, v in kinds.items()}
    total = sum(weights.values()) or 1.0
    weights = {k: w / total for k, w in weights.items()}
    time_ms = sum(w * kinds[k]["time_ms"] for k, w in weights.items())
    phases = {
        p: sum(w * kinds[k]["phases_ms"][p] for k, w in weights.items()) for p in MEASURED_PHASES
    }
    return {
        "time_ms": time_ms,
        "phases_ms": phases,
        "kinds": kinds,
        "freq": dict(freq),
        "missing": missing,
    }


def timed_passes(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    t: Tensor,
    device: torch.device,
    *,
    vector_backward: bool,
    hvp: bool,
    min_time: float = 0.05,
    forward: bool = False,
    in_step: Collection[str] = (),
) -> dict[str, float]:
    """Seconds of the model's own passes that the floor builds on.

    * ``forward``: the model's forward pass and loss, building the graph (when ``forward``).
    * ``backward``: gradient of the loss w.r.t. all parameters (graph retained).
    * ``vector_backward``: one vector back-propagated from the logits to the output of every
      module with parameters (no weight gradients): an extra backward pass of a Fisher method.
    * ``hvp``: one Hessian-vector product through the model (double backward).

    Args:
        model: The model.
        loss_fn: Loss of ``(logits, targets)``.
        x: Inputs.
        t: Targets.
        device: Device.
        vector_backward: Measure ``vector_backward``.
        hvp: Measure ``hvp``.
        min_time: Seconds per measurement at least.
        forward: Measure ``forward``.
        in_step: Cost-model pass kinds (``backward``, ``grad``, ``hvp``) whose first pass in
            a step to measure too (:func:`in_step_passes`).

    Returns:
        ``{name: seconds}``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    out = _first_order_passes(model, loss_fn, x, t, device, params, vector_backward, min_time)
    if hvp:
        out["hvp"] = _hvp_pass(model, loss_fn, x, t, device, params, min_time)
    if forward:
        from .kernels import time_callable

        out["forward"] = time_callable(lambda: loss_fn(model(x), t), device, min_time=min_time)
    names = {n for kind in in_step if (n := in_step_name(kind, vector_backward)) is not None}
    if names:
        out.update(in_step_passes(model, loss_fn, x, t, device, names))
    return out


#: Rounds of :func:`in_step_passes` at least and at most, and the seconds after which the
#: minimum suffices.
IN_STEP_ROUNDS = (5, 25)
IN_STEP_MIN_TIME = 0.3


def in_step_passes(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    t: Tensor,
    device: torch.device,
    names: Collection[str],
) -> dict[str, float]:
    """Seconds that the first extra pass of each kind adds to a forward and backward pass.

    The passes of :func:`timed_passes` run again and again through one retained graph, whose
    saved tensors stay in the caches and whose outputs reuse the same memory. A training step
    runs its first extra pass right after its own forward and backward, on a new graph; and a
    Hessian-vector product needs that backward to build the gradient's graph
    (``create_graph=True``), which costs more than a plain one. Each pass is therefore also
    timed as the difference between a plain step (forward, loss, gradient of every parameter)
    and the same step followed by the pass, the two timed alternately and paired (the median
    of the differences), in at least ``IN_STEP_ROUNDS[0]`` rounds. ``names`` chooses from:

    * ``grad_in_step``: a second gradient of every parameter, from a vector at the logits;
    * ``vector_backward_in_step``: a vector from the logits back to the output of every module
      with parameters (no weight gradients);
    * ``hvp_in_step``: the gradient built with its graph and one Hessian-vector product.

    With the CPU grids' steady allocator setting (2 threads), on mlp512 at B=32: 0.53 ms for
    the second gradient in a step against 0.53 ms through a retained graph, 1.67 ms for the
    product against 1.53 ms; on cnn_small at B=32, 1.30 against 1.05 ms and 4.5 against 4.0
    ms. Under glibc's defaults the gaps are larger (mlp512 B=32, the product: 2.56 against
    1.75 ms).

    Returns:
        ``{name: seconds}``, each at least 0.
    """
    from ..curvature.products import twice_differentiable

    params = [p for p in model.parameters() if p.requires_grad]
    with_params = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(False))]

    def base() -> None:
        torch.autograd.grad(loss_fn(model(x), t), params, allow_unused=True)

    def second_grad() -> None:
        logits = model(x)
        torch.autograd.grad(loss_fn(logits, t), params, retain_graph=True, allow_unused=True)
        torch.autograd.grad(logits, params, torch.ones_like(logits), allow_unused=True)

    def to_outputs() -> None:
        outputs: list[Tensor] = []

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, Tensor) and output.requires_grad:
                outputs.append(output)

        handles = [m.register_forward_hook(keep) for m in with_params]
        try:
            logits = model(x)
        finally:
            for h in handles:
                h.remove()
        torch.autograd.grad(loss_fn(logits, t), params, retain_graph=True, allow_unused=True)
        torch.autograd.grad(logits, outputs or [logits], torch.ones_like(logits), allow_unused=True)

    def product() -> None:
        with twice_differentiable(True):
            loss = loss_fn(model(x), t)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        pairs = [(p, g) for p, g in zip(params, grads) if g is not None and g.requires_grad]
        if pairs:
            torch.autograd.grad([g for _, g in pairs], [p for p, _ in pairs], [p for p, _ in pairs])

    extras: dict[str, Callable[[], None]] = {
        "grad_in_step": second_grad,
        "vector_backward_in_step": to_outputs,
        "hvp_in_step": product,
    }
    unknown = set(names) - set(extras)
    if unknown:
        raise ValueError(f"names: unknown in-step passes {sorted(unknown)}; known: {list(extras)}")
    return {name: _paired_difference(base, extras[name], device) for name in names}


def _paired_difference(
    base: Callable[[], None], fn: Callable[[], None], device: torch.device
) -> float:
    """Median over rounds of ``fn``'s time minus ``base``'s (timed back to back), at least 0."""
    for f in (base, fn):
        f()
    diffs: list[float] = []
    spent = 0.0
    low, high = IN_STEP_ROUNDS
    while len(diffs) < high and (len(diffs) < low or spent < IN_STEP_MIN_TIME):
        times = []
        for f in (base, fn):
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            times.append(time.perf_counter() - t0)
        spent += sum(times)
        diffs.append(times[1] - times[0])
    return max(0.0, _median(diffs))


def _first_order_passes(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    t: Tensor,
    device: torch.device,
    params: list[nn.Parameter],
    vector_backward: bool,
    min_time: float,
) -> dict[str, float]:
    from .kernels import time_callable

    outputs: list[Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.requires_grad:
            outputs.append(output)

    handles = []
    if vector_backward:
        for m in model.modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                handles.append(m.register_forward_hook(keep))
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    loss = loss_fn(logits, t)
    out = {
        "backward": time_callable(
            lambda: torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True),
            device,
            min_time=min_time,
        )
    }
    if vector_backward and outputs:
        v = torch.randn_like(logits)
        out["vector_backward"] = time_callable(
            lambda: torch.autograd.grad(logits, outputs, v, retain_graph=True, allow_unused=True),
            device,
            min_time=min_time,
        )
    elif vector_backward:
        out["vector_backward"] = out["backward"]
    return out


def _hvp_pass(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    t: Tensor,
    device: torch.device,
    params: list[nn.Parameter],
    min_time: float,
) -> float:
    from ..curvature.products import twice_differentiable
    from .kernels import time_callable

    with twice_differentiable(True):  # the attention the methods' own products go through
        loss = loss_fn(model(x), t)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    pairs = [(p, g) for p, g in zip(params, grads) if g is not None and g.requires_grad]
    vs = [torch.randn_like(p) for p, _ in pairs]
    ps, gs = [p for p, _ in pairs], [g for _, g in pairs]
    return time_callable(
        lambda: torch.autograd.grad(gs, ps, vs, retain_graph=True, allow_unused=True),
        device,
        min_time=min_time,
    )
