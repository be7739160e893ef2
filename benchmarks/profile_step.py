"""Profile one benchmark configuration's steps with torch.profiler, per phase and per op.

Where does a method's time above its floor go? This runs the same step as the harness's worker
(same problem, gradient maker, optimizer), wraps the phases in ``record_function`` labels, and
prints for an update step and for idle steps: the time of each phase, and the operators with
the most self CPU time (with input shapes), plus the share of the step not spent in any
operator (Python and dispatch overhead).

    python benchmarks/profile_step.py --method kfac --model mlp512 --batch-size 128 --interval 10
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from precond.bench.problems import get_problem
from precond.bench.worker import MomentumSGD, _make_step
from precond.registry import make_gradient_maker

PHASES = {
    "_curvature_backward": "extra_backward",
    "update_curvature": "curvature",
    "update_preconditioner": "refresh",
    "precondition": "apply",
    "forward": "forward",
    "_backward": "backward",
}


def _label(gm: Any) -> None:
    for attr, phase in PHASES.items():
        fn = getattr(gm, attr, None)
        if fn is None:
            continue

        def wrapped(*a: Any, _fn: Any = fn, _phase: str = phase, **k: Any) -> Any:
            with record_function(f"phase::{_phase}"):
                return _fn(*a, **k)

        setattr(gm, attr, wrapped)


def _report(
    prof: Any, title: str, wall_ms: float, steps: int, top: int, per_phase: int = 8
) -> None:
    events = prof.key_averages(group_by_input_shape=True)
    phases = {e.key: e.cpu_time_total / 1e3 / steps for e in events if e.key.startswith("phase::")}
    ops = [e for e in events if not e.key.startswith(("phase::", "step"))]
    op_self = sum(e.self_cpu_time_total for e in ops) / 1e3 / steps
    print(f"\n=== {title}: {wall_ms:.2f} ms/step (wall, profiled) ===")
    print("phases (ms/step): " + ", ".join(f"{k[7:]} {v:.2f}" for k, v in sorted(phases.items())))
    print(
        f"time inside operators: {op_self:.2f} ms/step; outside (Python, dispatch, hooks): "
        f"{max(0.0, wall_ms - op_self):.2f} ms/step"
    )
    print(f"top {top} operators by self CPU time (ms/step, calls/step, input shapes):")
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:top]:
        shapes = str(e.input_shapes)[:70]
        print(
            f"  {e.self_cpu_time_total / 1e3 / steps:8.3f}  {e.count / steps:6.1f}  "
            f"{e.key:<32} {shapes}"
        )
    by_phase: dict[str, dict[str, list[float]]] = {}
    for ev in prof.events():
        phase, parent = None, ev.cpu_parent
        while parent is not None:
            if parent.name.startswith("phase::"):
                phase = parent.name[7:]
                break
            parent = parent.cpu_parent
        if phase is None or ev.name.startswith("phase::"):
            continue
        key = f"{ev.name} {list(ev.input_shapes)[:3]}"[:90]
        slot = by_phase.setdefault(phase, {}).setdefault(key, [0.0, 0.0])
        slot[0] += ev.self_cpu_time_total / 1e3 / steps
        slot[1] += 1 / steps
    for phase, table in sorted(by_phase.items()):
        items = sorted(table.items(), key=lambda kv: -kv[1][0])[:per_phase]
        print(f"  [{phase}] top operators:")
        for key, (ms, calls) in items:
            print(f"      {ms:8.3f}  {calls:5.1f}  {key}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--method", default="kfac")
    p.add_argument("--model", default="mlp512")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--idle-steps", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    problem = get_problem(args.model)
    torch.manual_seed(0)
    model = problem.model_fn()
    x, t = problem.batch(args.batch_size)
    gm = make_gradient_maker(args.method, model, curvature_upd_interval=args.interval)
    opt = MomentumSGD(model.parameters(), lr=1e-3)
    step = _make_step(gm, model, opt, x, t)
    _label(gm)
    for _ in range(3):  # warm-up, then align to the next update step
        step()
    while args.interval > 1 and gm.step % args.interval != 0:
        step()
    print(
        f"{args.method} on {args.model}, B={args.batch_size}, T={args.interval}, "
        f"{args.threads} threads, torch {torch.__version__}"
    )
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        with record_function("step"):
            step()
        wall = 1e3 * (time.perf_counter() - t0)
    _report(prof, "update step", wall, 1, args.top)
    if args.interval > 1:
        n = min(args.idle_steps, args.interval - 1)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            for _ in range(n):
                with record_function("step"):
                    step()
            wall = 1e3 * (time.perf_counter() - t0) / n
        _report(prof, "idle step", wall, n, args.top)


if __name__ == "__main__":
    main()
