"""One benchmark configuration, measured in a fresh process.

``python -m precond.bench.worker SPEC.json RESULT.json`` reads a configuration (method, model,
batch size, interval, device, threads, step counts), measures it and writes one result row.
Errors inside the measurement become rows with ``status`` and ``reason``; the runner turns
crashes and time-outs of the process itself into such rows.

Order of work, chosen so that each number measures only what it should:

1. Code warm-up: tiny linear-algebra kernels, an SGD step and two steps of the method on a tiny
   model, so that lazily loaded code and Python modules are not counted as the method's memory.
2. Model and synthetic batch; memory baseline (peak reset).
3. Gradient maker and optimizer; warm-up steps; timed steps; memory peak read.
4. CUDA only: a profiled pass (phases with device synchronisation).
5. The floor: the model's passes and the cost model's kernels, timed alone.
6. CPU only, last (it allocates memory the resident set would count): the live-tensor pass, a
   fresh model and gradient maker run for a cold and a warm update step (and one idle step)
   with :class:`~precond.bench.memory.LiveTensorProbe` counting live tensor bytes.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from ..methods.base import PreconditionedGradientMaker
from ..methods.cost import CostModel, KernelOp
from ..registry import make_gradient_maker
from .contention import ContentionMeter
from .floor import PASS_KINDS, first_pass_name, numel_mb, pass_name, phase_costs
from .kernels import KNOWN_KINDS, KernelTimer, make_kernel
from .measure import (
    FALLBACK_METHODS,
    PHASE_MARK,
    PHASE_METHODS,
    PhaseTimer,
    run_steps,
    schedule_frequencies,
    summarise,
    timed_passes,
)
from .memory import LiveTensorProbe, MemoryProbe, tensor_mb
from .problems import get_problem, make_batch
from .profile import STEP_MARK, summarise_profile

__all__ = ["DEFAULT_SPEC", "WORKER_PARTS", "main", "op_profile", "run_config"]

#: Parts of a worker's time (``parts_s`` of a row): code warm-up, model and gradient maker;
#: warm-up and timed steps (and CUDA's profiled pass); SGD steps in the worker's process; the
#: floor's passes and kernels; the live-tensor pass.
WORKER_PARTS = ("setup", "steps", "sgd", "floor", "live")

#: Defaults of a configuration spec (the runner fills every key).
DEFAULT_SPEC: dict[str, Any] = {
    "method": "plain",
    "model": "mlp_tiny",
    "batch_size": 32,
    "interval": 1,
    "device": "cpu",
    "threads": 0,
    "warmup": 3,
    "repeats": 7,
    "rare_repeats": 3,
    "max_steps": 40,
    "budget_s": 120.0,
    "seed": 0,
    "lr": 1e-3,
    "options": {},
    "kernel_cache": {},
    "kernel_min_time": 0.02,
    "cold_kernels": False,
    "min_time": 1.0,
    "sample_time": 0.0,
    "live_memory": True,
    "fast_forward": True,
    "flush_denormals": True,
    "op_profile": False,
}

#: Samples of the most frequent step kind in an operator profile.
PROFILE_REPEATS = 5
#: Samples of each rarer step kind in an operator profile.
PROFILE_RARE_REPEATS = 3
#: Steps run under the profiler before the profiled ones (the first are slowed by its start).
PROFILE_WARMUP = 2


class MomentumSGD:
    """SGD with heavy-ball momentum, the update of ``torch.optim.SGD(momentum=m)``.

    The same kernels as ``torch.optim.SGD``'s foreach path, without ``torch.optim``: creating
    any ``torch.optim`` optimizer imports ``torch._dynamo`` (seconds per fresh process).

    Args:
        params: Parameters.
        lr: Learning rate.
        momentum: Momentum.
    """

    def __init__(self, params: Any, lr: float, momentum: float = 0.9) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr = lr
        self.momentum = momentum
        self.bufs: list[torch.Tensor] | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """``buf ← m·buf + g``; ``p ← p − lr·buf``."""
        with_grad = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in with_grad if p.grad is not None]
        if self.bufs is None:
            self.bufs = [g.detach().clone() for g in grads]
        else:
            torch._foreach_mul_(self.bufs, self.momentum)
            torch._foreach_add_(self.bufs, grads)
        torch._foreach_add_(with_grad, self.bufs, alpha=-self.lr)


def _loss(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, t)


def _make_step(
    gm: Any, model: nn.Module, opt: MomentumSGD, x: Any, t: Any, losses: list[Any] | None = None
) -> Any:
    """One training step; the last loss (a tensor: no host sync) is kept in ``losses``."""

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        dummy = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, dummy, t)
        _, loss = gm.forward_and_backward()
        opt.step()
        if losses is not None:
            losses[:] = [loss.detach()]

    return step


def _diverged(model: nn.Module, losses: list[Any]) -> bool:
    """Whether the last loss or any parameter is not finite (one host sync, after timing).

    A diverged run can time the wrong work: methods skip a curvature update whose statistics
    are not finite, so its step looks cheaper than a healthy one.
    """
    checks = [torch.isfinite(p.detach()).all() for p in model.parameters()]
    checks += [torch.isfinite(loss).all() for loss in losses]
    return not bool(torch.stack(checks).all()) if checks else False


def _warm_up_code(method: str, options: dict[str, Any], device: torch.device) -> None:
    small = {"matmul": (4, 4, 4), "bmm": (2, 4, 4, 4), "elementwise": (16,), "randn": (16,)}
    for kind in KNOWN_KINDS:
        make_kernel(kind, small.get(kind, (2, 4)), torch.float32, device)()
    tiny = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48, 6),
        nn.LayerNorm(6),
        nn.Linear(6, 3),
    ).to(device)
    x, t = make_batch((2, 4, 4), 3, 4, device)
    for name in dict.fromkeys(["plain", method]):
        try:
            gm = make_gradient_maker(name, tiny, **options)
            opt = MomentumSGD(tiny.parameters(), lr=1e-4)
            step = _make_step(gm, tiny, opt, x, t)
            for _ in range(2):
                step()
        except Exception:  # best effort: the real run reports real errors
            pass


def _backward_overridden(gm: Any) -> bool:
    impl = getattr(type(gm), "_backward", None)
    return impl is not None and impl is not PreconditionedGradientMaker._backward


def _failure(spec: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    oom = isinstance(exc, MemoryError | torch.OutOfMemoryError) or "out of memory" in msg.lower()
    return {
        "status": "oom" if oom else "error",
        "reason": f"{type(exc).__name__}: {msg}"[:400],
        "traceback": traceback.format_exc(limit=6)[-2000:],
    }


def _sgd_in_process(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, device: torch.device, spec: dict[str, Any]
) -> float:
    """Median SGD step of the same model and batch, in this process (after the memory reading).

    Ratios to an SGD step timed in the same process are immune to what differs between
    processes (thread placement, memory layout, clock), which moves a step by 10-30% here.
    """
    gm = make_gradient_maker("plain", model)
    opt = MomentumSGD(model.parameters(), lr=float(spec["lr"]))
    timer = PhaseTimer(gm, device)
    samples, _ = run_steps(
        _make_step(gm, model, opt, x, t),
        timer,
        {"idle": 1.0},
        device=device,
        warmup=int(spec["warmup"]),
        repeats=int(spec["repeats"]),
        rare_repeats=1,
        max_steps=int(spec["max_steps"]),
        budget_s=float(spec["budget_s"]),
        min_time=0.5 * float(spec["min_time"]),
        sample_time=float(spec["sample_time"]),
    )
    return float(summarise(samples, {"idle": 1.0})["time_ms"])


def next_update_step(gm: Any, after: int, horizon: int = 1_000_000) -> int | None:
    """First step ``>= after`` at which the curvature or the preconditioner is updated.

    Args:
        gm: The gradient maker (``None`` without schedules).
        after: First step considered.
        horizon: Steps searched at most.

    Returns:
        The step, or ``None`` if the schedules have no update in the horizon.
    """
    cs = getattr(gm, "curvature_schedule", None)
    ps = getattr(gm, "preconditioner_schedule", None)
    if cs is None or ps is None:
        return None
    for s in range(after, after + horizon):
        if cs.is_update_step(s) or ps.is_update_step(s):
            return s
    return None


def fast_forward(gm: Any) -> Any:
    """A function advancing ``gm``'s step counter to its next update step (steps skipped).

    The idle steps skipped would repeat the ones sampled: they apply the stored preconditioner
    and nothing else (the contract test checks it), so the next update step comes at once.
    """

    def forward() -> int:
        now = int(getattr(gm, "_step", -1))
        target = next_update_step(gm, now, horizon=10_000) if now >= 0 else None
        if target is None or target <= now:
            return 0
        gm._step = target
        return target - now

    return forward


def live_tensor_pass(
    method: str,
    problem: Any,
    options: dict[str, Any],
    batch_size: int,
    seed: int,
    lr: float,
    device: torch.device,
) -> dict[str, Any] | None:
    """Peak live CPU tensor bytes of a short run: a cold update, an idle and a warm update step.

    A fresh model and gradient maker run step 0 (the first update, which creates the state)
    and step 1; when step 1 is not an update (``T > 1``), the step counter is advanced to the
    next update step of the schedules, which then runs warm. Live bytes do not depend on
    timing or on how many identical idle steps came before, so this short run sees the peak
    of the long one; skipping the idle steps keeps it cheap at ``T = 100``.

    Args:
        method: Registry name.
        problem: The problem.
        options: The method's options (``curvature_upd_interval`` included).
        batch_size: Batch size.
        seed: Seed of model and data.
        lr: Learning rate of the momentum SGD.
        device: A CPU device (``None`` is returned for others).

    Returns:
        ``live_growth_mb`` (peak above the model and data), ``live_end_mb`` (held after the
        last step: gradients, momentum and the method's state), ``live_steps`` (the steps run)
        and ``live_events``; ``None`` if the probe cannot run here.
    """
    if device.type != "cpu":
        return None
    torch.manual_seed(seed)
    model = problem.model_fn().to(device)
    x, t = problem.batch(batch_size, device, seed)
    probe = LiveTensorProbe()
    if not probe.start():
        return None
    steps: list[int] = []
    try:
        gm = make_gradient_maker(method, model, **options)
        opt = MomentumSGD(model.parameters(), lr=lr)
        _mark_phases(gm, probe)
        inner = _make_step(gm, model, opt, x, t)

        def step() -> None:
            probe.mark("fb")
            inner()

        for _ in range(2):
            steps.append(int(getattr(gm, "step", len(steps))))
            step()
        current = int(getattr(gm, "step", 2))
        target = next_update_step(gm, 1)
        if target is not None and target != 1 and hasattr(gm, "_step"):
            gm._step = max(current, target)  # identical idle steps skipped (see docstring)
            steps.append(gm._step)
            step()
    finally:
        reading = probe.stop()
    if reading is None:
        return None
    return {
        "live_growth_mb": reading.peak_mb,
        "live_end_mb": reading.end_mb,
        "live_phases_mb": reading.segments_mb,
        "live_steps": steps,
        "live_events": reading.events,
    }


def _mark_phases(gm: Any, probe: LiveTensorProbe) -> None:
    """Label the live-tensor timeline with the phase running (the phases of PhaseTimer)."""
    stack = ["fb"]

    def wrap(fn: Any, phase: str) -> Any:
        def marked(*args: Any, **kwargs: Any) -> Any:
            stack.append(phase)
            probe.mark(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                stack.pop()
                probe.mark(stack[-1])

        return marked

    for owner, names in ((gm, PHASE_METHODS), (getattr(gm, "fallback", None), FALLBACK_METHODS)):
        if owner is None:
            continue
        for attr, phase in names.items():
            fn = getattr(owner, attr, None)
            if callable(fn):
                setattr(owner, attr, wrap(fn, phase))


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this process.

    Args:
        spec: The configuration (keys of :data:`DEFAULT_SPEC`).

    Returns:
        The result row (``status`` is ``"ok"``, ``"error"`` or ``"oom"``).
    """
    spec = {**DEFAULT_SPEC, **spec}
    started = time.perf_counter()
    cpu_started = time.process_time()
    row: dict[str, Any] = {
        k: spec[k] for k in ("method", "model", "batch_size", "interval", "device", "threads")
    }
    row.update(status="ok", reason=None)
    if spec["options"]:
        row["options"] = dict(spec["options"])
    # once per process, before any tensor operation starts the thread pool
    row["denormals_flushed"] = configure_cpu(int(spec["threads"]), bool(spec["flush_denormals"]))
    caught: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            if spec["op_profile"]:
                row["op_profile"] = op_profile(spec)
            else:
                row.update(_measure(spec))
            if spec["live_memory"] and not spec["op_profile"]:
                t0 = time.perf_counter()
                row.update(_live_fields(spec, float(row["base_mb"])))
                row["parts_s"]["live"] = time.perf_counter() - t0
            caught = list(dict.fromkeys(str(w.message) for w in records))
    except BaseException as exc:  # every failure becomes a row
        if isinstance(exc, KeyboardInterrupt):
            raise
        row.update(_failure(spec, exc))
    row["warnings"] = caught[:5]
    row["worker_s"] = time.perf_counter() - started
    # CPU seconds of the worker's threads: with one thread, close to the wall time the worker
    # would take on an idle core (other processes delay it but do not add CPU time).
    row["worker_cpu_s"] = time.process_time() - cpu_started
    return row


def configure_cpu(threads: int, flush_denormals: bool) -> bool:
    """Set the intra-op threads and, if asked, flush denormal floats to zero (x86 FTZ/DAZ).

    The floating-point mode is a per-thread register that new threads inherit from the thread
    that creates them, so it is set before anything starts the thread pool (the fork server
    runs no tensor operation; a fresh interpreter has run none either): then every thread of
    the pool flushes. Why the bench flushes: :class:`~precond.bench.runner.BenchSpec`.

    Args:
        threads: Intra-op threads (0: torch's default).
        flush_denormals: Flush (``True``) or keep (``False``) denormal floats.

    Returns:
        Whether denormals are flushed (``False`` also where the CPU cannot flush them).
    """
    flushed = bool(torch.set_flush_denormal(flush_denormals)) and flush_denormals
    if threads > 0:
        torch.set_num_threads(threads)
    return flushed


def _setup(spec: dict[str, Any]) -> tuple[torch.device, dict[str, Any], nn.Module, Any, Any]:
    """Code warm-up, the seeded model and batch of a configuration.

    The process's threads and floating-point mode are set before (:func:`run_config`).

    Returns:
        ``(device, options, model, x, t)``; ``options`` are the method's config options
        (the problem's, the spec's and ``curvature_upd_interval``).
    """
    device = torch.device(spec["device"])
    problem = get_problem(spec["model"])
    _warm_up_code(spec["method"], {**problem.options, **spec["options"]}, device)
    torch.manual_seed(int(spec["seed"]))
    model = problem.model_fn().to(device)
    x, t = problem.batch(int(spec["batch_size"]), device, int(spec["seed"]))
    interval = int(spec["interval"])
    options = {**problem.options, **spec["options"], "curvature_upd_interval": interval}
    return device, options, model, x, t


def op_profile(spec: dict[str, Any]) -> dict[str, Any]:
    """Operator profile of a configuration's steps (see :mod:`precond.bench.profile`).

    Called by :func:`run_config`, which sets the process's threads and floating-point mode.
    The configuration is built as for its measurement and warmed up with as many steps; then
    :data:`PROFILE_WARMUP` steps run under the profiler and are not counted (the first steps
    under a profiler run up to three times slower), and :data:`PROFILE_REPEATS` steps of the
    most frequent kind and :data:`PROFILE_RARE_REPEATS` of each rarer kind are profiled (idle
    steps in between skipped as in the measurement).

    Args:
        spec: The configuration (keys of :data:`DEFAULT_SPEC`).

    Returns:
        :func:`~precond.bench.profile.summarise_profile` of the profiled steps.
    """
    spec = {**DEFAULT_SPEC, **spec}
    device, options, model, x, t = _setup(spec)
    gm = make_gradient_maker(spec["method"], model, **options)
    opt = MomentumSGD(model.parameters(), lr=float(spec["lr"]))
    timer = PhaseTimer(gm, device, mark=True)
    inner = _make_step(gm, model, opt, x, t)

    def step() -> None:
        with record_function(STEP_MARK):
            inner()

    freq = schedule_frequencies(gm, start=int(spec["warmup"]))
    for _ in range(int(spec["warmup"])):
        inner()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        # The first steps under a profiler run up to 3 × slower: not counted (not STEP_MARK).
        for _ in range(PROFILE_WARMUP):
            with record_function(PHASE_MARK + "warmup"):
                inner()
        samples, _ = run_steps(
            step,
            timer,
            freq,
            device=device,
            warmup=0,
            repeats=PROFILE_REPEATS,
            rare_repeats=PROFILE_RARE_REPEATS,
            max_steps=int(spec["max_steps"]),
            budget_s=float(spec["budget_s"]),
            fast_forward=fast_forward(gm) if spec["fast_forward"] else None,
        )
    return summarise_profile(prof.events(), [s.kind for s in samples], freq)


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    marks = [time.perf_counter()]
    device, options, model, x, t = _setup(spec)
    base_mb = tensor_mb(*model.parameters(), *model.buffers(), x, t)
    probe = MemoryProbe(device)
    probe.start()

    gm = make_gradient_maker(spec["method"], model, **options)
    opt = MomentumSGD(model.parameters(), lr=float(spec["lr"]))
    profiled_inline = device.type != "cuda"
    timer = PhaseTimer(gm, device, sync=False)
    losses: list[Any] = []
    step = _make_step(gm, model, opt, x, t, losses)
    freq = schedule_frequencies(gm, start=int(spec["warmup"]))

    info: dict[str, Any] = {}

    def run(warmup: int) -> tuple[list[Any], int]:
        return run_steps(
            step,
            timer,
            freq,
            device=device,
            warmup=warmup,
            repeats=int(spec["repeats"]),
            rare_repeats=int(spec["rare_repeats"]),
            max_steps=int(spec["max_steps"]),
            budget_s=float(spec["budget_s"]),
            min_time=float(spec["min_time"]),
            sample_time=float(spec["sample_time"]),
            info=info,
            fast_forward=fast_forward(gm) if spec["fast_forward"] else None,
        )

    # Contention is measured over every timing of the worker: steps, SGD steps and kernels.
    meter = ContentionMeter()
    meter.start()
    marks.append(time.perf_counter())
    samples, steps = run(int(spec["warmup"]))
    stop = info.get("stop")
    mem = probe.read()
    diverged = _diverged(model, losses)
    prof = samples
    if not profiled_inline:
        timer.sync = True
        prof, _ = run(0)

    marks.append(time.perf_counter())
    sgd_ms = None
    if spec["method"] != "plain":
        sgd_ms = _sgd_in_process(model, x, t, device, spec)
    marks.append(time.perf_counter())

    cost, floor_note = CostModel(), None
    if not hasattr(gm, "cost_model"):
        if spec["method"] != "plain":
            floor_note = f"{type(gm).__name__} has no cost_model(): the floor is SGD's step"
    else:
        try:
            cost = gm.cost_model()
        except Exception as exc:  # a broken cost model must not lose the measurement
            floor_note = f"cost_model() failed ({type(exc).__name__}: {exc}): floor is SGD's"
    need_vec = any(op.kind == "backward" for op in cost.ops)
    need_hvp = any(op.kind == "hvp" for op in cost.ops)
    need_fwd = any(op.kind == "forward" for op in cost.ops)
    opt.zero_grad(set_to_none=True)
    passes = timed_passes(
        model,
        _loss,
        x,
        t,
        device,
        vector_backward=need_vec,
        hvp=need_hvp,
        forward=need_fwd,
        in_step={op.kind for op in cost.ops if op.kind in PASS_KINDS},
    )
    kt = KernelTimer(
        device,
        spec["kernel_cache"],
        float(spec["kernel_min_time"]),
        cold=bool(spec["cold_kernels"]),
    )

    def kernel_ms(op: KernelOp) -> float:
        return 1e3 * kt.seconds(op)

    def pass_ms(kind: str) -> float:
        return 1e3 * passes.get(pass_name(kind, passes), 0.0)

    costs = phase_costs(
        cost,
        kernel_ms,
        backward_ms=pass_ms("backward"),
        hvp_ms=pass_ms("hvp"),
        num_classes=get_problem(spec["model"]).num_classes,
        forward_ms=pass_ms("forward"),
        grad_ms=pass_ms("grad"),
        first_ms={
            kind: 1e3 * passes[name]
            for kind in PASS_KINDS
            if (name := first_pass_name(kind, passes)) is not None
        },
    )
    kt.release()
    other_cores = meter.stop()
    marks.append(time.perf_counter())
    overridden = _backward_overridden(gm)
    headline = summarise(
        samples, freq, backward_overridden=overridden, plain_backward_s=passes["backward"]
    )
    profile = summarise(
        prof, freq, backward_overridden=overridden, plain_backward_s=passes["backward"]
    )
    return {
        "time_ms": headline["time_ms"],
        "phases_ms": profile["phases_ms"],
        "kinds": {
            k: {**v, "phases_ms": profile["kinds"].get(k, v)["phases_ms"]}
            for k, v in headline["kinds"].items()
        },
        "freq": headline["freq"],
        "missing_kinds": headline["missing"],
        "steps": steps,
        "stop": stop,
        "skipped_steps": int(info.get("skipped") or 0),
        "capped": stop == "budget",
        "diverged": diverged,
        "other_cores": other_cores,
        "peak_mb": base_mb + mem.growth_mb,
        "growth_mb": mem.growth_mb,
        "base_mb": base_mb,
        "mem_probe": mem.probe,
        "state_mb": numel_mb(cost.state_numel, cost.state_dtype),
        "transient_mb": numel_mb(cost.transient_numel, cost.state_dtype),
        "floor_costs_ms": costs.ms,
        "floor_kernels": costs.kernels,
        "floor_unknown": sorted(set(costs.unknown)),
        "floor_note": floor_note,
        "passes_ms": {k: 1e3 * v for k, v in passes.items()},
        "kernel_cache_new": kt.new,
        "sgd_in_process_ms": sgd_ms,
        # Seconds per part of the worker's work (the time accounting of a run sums them).
        "parts_s": dict(zip(WORKER_PARTS[:4], (b - a for a, b in itertools.pairwise(marks)))),
    }


def _live_fields(spec: dict[str, Any], base_mb: float) -> dict[str, Any]:
    """The live-tensor pass's fields of a row (run after the timed measurement is released)."""
    device = torch.device(spec["device"])
    problem = get_problem(spec["model"])
    options = {
        **problem.options,
        **spec["options"],
        "curvature_upd_interval": int(spec["interval"]),
    }
    try:
        live = live_tensor_pass(
            spec["method"],
            problem,
            options,
            int(spec["batch_size"]),
            int(spec["seed"]),
            float(spec["lr"]),
            device,
        )
    except Exception as exc:  # the timed measurement stands without it
        return {"live_note": f"live-tensor pass failed ({type(exc).__name__}: {exc})"[:300]}
    if live is None:
        return {}
    return {**live, "live_peak_mb": base_mb + live["live_growth_mb"]}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m precond.bench.worker SPEC.json RESULT.json``.

    Args:
        argv: ``[spec_path, result_path]`` (default: ``sys.argv[1:]``).

    Returns:
        The exit code (0 also when the measurement failed: the row says why).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m precond.bench.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        spec = json.load(f)
    row = run_config(spec)
    with open(args[1], "w") as f:
        json.dump(row, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
