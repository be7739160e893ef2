"""Markdown report of a benchmark run: environment, targets, one table per model, failures."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .floor import FLOOR_PHASES
from .problems import describe
from .profile import phase_groups
from .ratios import BASELINE
from .runner import BASELINE_SLOW_LIMIT, KERNEL_SLOW_LIMIT, SLOW_LIMIT

__all__ = ["EFFICIENCY_TARGET", "MEMORY_TARGET", "render_markdown", "target_misses"]

#: Targets: efficiency (floor / measured time) at least, peak memory / memory floor at most.
EFFICIENCY_TARGET = 0.8
MEMORY_TARGET = 1.2

Row = dict[str, Any]


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    v = float(value)
    if v != 0 and abs(v) < 10**-(digits):
        return f"{v:.1e}"
    return f"{v:.{digits}f}"


def _ms(value: Any) -> str:
    if value is None:
        return "—"
    v = float(value)
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _phases(phases: Mapping[str, float] | None) -> str:
    if not phases:
        return "—"
    return " · ".join(_ms(phases.get(p, 0.0)) for p in FLOOR_PHASES)


def _config(row: Row) -> str:
    t = "" if row.get("method") == BASELINE else f" T={row.get('interval')}"
    return f"{row.get('method')} {row.get('model')} B={row.get('batch_size')}{t}"


def target_misses(
    rows: Iterable[Row],
    efficiency: float = EFFICIENCY_TARGET,
    memory: float = MEMORY_TARGET,
) -> list[dict[str, Any]]:
    """Rows of methods (not the baseline) that miss a target, and by how much.

    Args:
        rows: Rows with ratios attached.
        efficiency: Minimum efficiency.
        memory: Maximum peak / memory floor (the headline memory: live tensor bytes where
            measured, else the resident set).

    Returns:
        ``{"config", "target", "value", "by"}`` per miss (``by`` is the shortfall or excess).
    """
    misses = []
    for r in rows:
        if r.get("method") == BASELINE or r.get("status") != "ok":
            continue
        eff, over = r.get("efficiency"), r.get("peak_over_floor", r.get("mem_over_floor"))
        if eff is not None and eff < efficiency:
            misses.append(
                {"config": _config(r), "target": "efficiency", "value": eff, "by": efficiency - eff}
            )
        if over is not None and over > memory:
            misses.append(
                {"config": _config(r), "target": "memory", "value": over, "by": over - memory}
            )
    return misses


def _listed(rows: list[Row], n: int = 5) -> str:
    """The first ``n`` configurations of ``rows``, comma-separated (for the notes)."""
    return ", ".join(_config(r) for r in rows[:n])


def process_spread(row: Row) -> float | None:
    """(slowest − fastest) / kept step time over a row's workers (``None``: fewer than two)."""
    times = [float(t) for t in row.get("process_times_ms") or [] if t is not None]
    if len(times) < 2 or not row.get("time_ms"):
        return None
    return (max(times) - min(times)) / float(row["time_ms"])


def _process_spread(rows: list[Row]) -> str:
    spreads = sorted(s for s in map(process_spread, rows) if s is not None)
    text = (
        f"- {len(rows)} configurations were measured in {rows[0]['processes']} fresh workers "
        "each (the row kept has the median step time of those that did not run slow)"
    )
    if not spreads:
        return text + "."
    widest = max(rows, key=lambda r: process_spread(r) or 0.0)
    return (
        text + f"; between their workers the step time spread by {spreads[len(spreads) // 2]:.0%} "
        f"of the kept time in the median configuration, {spreads[-1]:.0%} at most "
        f"({_config(widest)}: "
        + ", ".join(_ms(t) for t in widest["process_times_ms"] if t is not None)
        + " ms)."
    )


def _header(meta: Mapping[str, Any]) -> list[str]:
    env = meta.get("env", {})
    spec = meta.get("spec", {})
    lines = ["# precond bench", ""]
    if env:
        lines += [
            f"Command: `{env.get('command', '')}`",
            "",
            f"Environment: torch {env.get('torch')}, {env.get('device')} "
            f"({env.get('device_name')}), {env.get('threads')} threads, "
            f"git {env.get('git_commit')}, {env.get('date')}.",
            "",
        ]
    if spec:
        join = ", ".join
        lines += [
            f"Grid: methods {join(spec.get('methods', []))}; "
            f"models {join(spec.get('models', []))}; "
            f"B ∈ {{{join(map(str, spec.get('batch_sizes', [])))}}}; "
            f"T ∈ {{{join(map(str, spec.get('intervals', [])))}}}; "
            f"{spec.get('warmup')} warm-up steps, {spec.get('repeats')} timed samples per step "
            f"kind ({spec.get('rare_repeats')} for update steps when T > 1)"
            + (
                f", 3 (2) once a kind's samples add up to {spec['sample_time']:g} s"
                if spec.get("sample_time")
                else ""
            )
            + (f", at least {spec['min_time']:g} s of timed steps" if spec.get("min_time") else "")
            + (
                "; idle steps beyond the samples skipped (fast-forward)"
                if spec.get("fast_forward")
                else ""
            )
            + {
                True: "; floor kernels timed once per run and shape",
                False: "; floor kernels timed in every worker (a low quantile over the workers)",
            }.get(spec.get("share_kernel_timings"), "")
            + {
                True: ", caches evicted before each run",
                False: "",
            }.get(spec.get("cold_kernels"), "")
            + (
                f"; configurations measured within {spec['processes_below_s']:g} s measured in "
                f"{spec['processes']} fresh workers (the row of median step time kept)"
                if (spec.get("processes") or 1) > 1 and spec.get("processes_below_s") is not None
                else f"; every configuration measured in {spec['processes']} fresh workers "
                "(the row of median step time kept)"
                if (spec.get("processes") or 1) > 1
                else ""
            )
            + (
                "; further workers started until "
                f"{spec['further_until_s'] / 60:.3g} min into the run"
                if spec.get("further_until_s") is not None and (spec.get("processes") or 1) > 1
                else ""
            )
            + (
                "; slow configurations measured again until "
                f"{spec['remeasure_until_s'] / 60:.3g} min into the run"
                if spec.get("remeasure_until_s") is not None and spec.get("retry_contended")
                else ""
            )
            + (
                f"; misses profiled until {spec['profile_until_s'] / 60:.3g} min into the run"
                if spec.get("profile_until_s") is not None and spec.get("profile_misses")
                else ""
            )
            + (
                "; C allocator: "
                + " ".join(f"{k}={v}" for k, v in sorted(spec["malloc_env"].items()))
                if spec.get("malloc_env")
                else ""
            )
            + (
                "; denormal floats flushed to zero in every worker (FTZ/DAZ)"
                if spec.get("flush_denormals")
                else ""
            )
            + ".",
            "",
        ]
    if "elapsed_s" in meta:
        lines += [_wall_time(meta), ""]
    lines += [
        "Columns: *ms/step* is the median time per step amortised over the interval "
        "(Σ over step kinds of frequency × median); *thr* ratios are SGD's time / time "
        "(throughput relative to SGD measured in the same run; *floor thr* is what any "
        "implementation could reach on this machine); *eff* = floor / measured time; *peak* is "
        "the headline peak memory: on a CPU the peak of live tensor bytes (model, data and the "
        "peak growth counted by PyTorch's CPU allocator over a cold and a warm update step), "
        "where not measured the resident set; *mem × SGD* divides it by SGD's; *mem floor* is "
        "SGD's peak plus the state and transient buffers the method's math must keep; *RSS* is "
        "the peak of the resident set (model, data and its peak growth in a fresh process, "
        "C allocator's retained memory included) and *RSS / floor* divides it by SGD's RSS "
        "peak plus the same state and transients; phases are "
        "amortised ms of fb · extra backward · curvature · refresh · apply (fb is the rest of "
        "the step: forward, backward, optimizer). See benchmarks/README.md for what the memory "
        "columns mean and their known biases.",
        "",
    ]
    return lines


def _wall_time(meta: Mapping[str, Any]) -> str:
    text = f"Wall time of the run: {float(meta['elapsed_s']) / 60:.1f} min"
    acc = meta.get("time_s") or {}
    if acc:
        text += (
            f" (inside workers {acc.get('workers', 0.0) / 60:.1f} min, waiting for idle cores "
            f"{acc.get('waits', 0.0) / 60:.1f} min, starting workers "
            f"{acc.get('startup', 0.0) / 60:.1f} min"
            + (
                f", profiling the misses {acc['profiles'] / 60:.1f} min"
                if acc.get("profiles")
                else ""
            )
            + ")"
        )
        parts = [(k.removeprefix("part_"), v) for k, v in acc.items() if k.startswith("part_")]
        if parts:
            text += "; inside the workers: " + ", ".join(
                f"{name} {seconds / 60:.1f} min" for name, seconds in parts
            )
    return text + "."


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def _verdict(misses: int, measured: int) -> str:
    if measured == 0:
        return "—"
    return f"✓ {measured}/{measured}" if misses == 0 else f"✗ {measured - misses}/{measured}"


def _targets(rows: list[Row]) -> list[str]:
    """Per-method summary: efficiency, slowdown vs SGD, memory over its floor, pass/fail."""
    methods = [m for m in dict.fromkeys(r.get("method") for r in rows) if m != BASELINE]
    live = any(r.get("memory_measure") == "live" for r in rows)
    measure = "live tensor bytes" if live else "resident set"
    lines = [
        f"## Summary: efficiency ≥ {EFFICIENCY_TARGET}, peak ≤ {MEMORY_TARGET} × memory floor",
        "",
        f"One line per method over its configurations. *eff* = floor / measured time (min · "
        f"median); *× SGD* = time / SGD's time (median · max); *peak / floor* is the headline "
        f"memory ({measure}; max, and where); *RSS / floor* is the resident-set peak over its "
        f"floor (secondary: it includes memory the C allocator keeps after frees); *eff ✓* and "
        f"*mem ✓* count the configurations that meet each target.",
        "",
        "| method | ok | eff min · med | eff ✓ | × SGD med · max | peak / floor max (where) "
        "| mem ✓ | RSS / floor max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    passing: list[str] = []
    for m in methods:
        ok = [r for r in rows if r.get("method") == m and r.get("status") == "ok"]
        total = sum(r.get("method") == m for r in rows)
        effs = [float(r["efficiency"]) for r in ok if r.get("efficiency") is not None]
        slow = [float(r["time_ratio"]) for r in ok if r.get("time_ratio") is not None]
        mems = [r for r in ok if r.get("peak_over_floor") is not None]
        rss = [float(r["mem_over_floor"]) for r in ok if r.get("mem_over_floor") is not None]
        worst_m = max(mems, key=lambda r: r["peak_over_floor"]) if mems else None
        n_e = sum(e < EFFICIENCY_TARGET for e in effs)
        n_m = sum(r["peak_over_floor"] > MEMORY_TARGET for r in mems)
        eff = f"{_f(min(effs))} · {_f(_median(effs))}" if effs else "—"
        sl = f"{_f(_median(slow))} · {_f(max(slow))}" if slow else "—"
        wm = f"{_f(worst_m['peak_over_floor'])} ({_where(worst_m)})" if worst_m is not None else "—"
        lines.append(
            f"| {m} | {len(ok)}/{total} | {eff} | {_verdict(n_e, len(effs))} | {sl} | {wm} "
            f"| {_verdict(n_m, len(mems))} | {_f(max(rss)) if rss else '—'} |"
        )
        if ok and len(ok) == total and n_e == 0 and n_m == 0 and effs and mems:
            passing.append(str(m))
    lines += [
        "",
        f"Methods meeting both targets in every configuration: {len(passing)} of "
        f"{len(methods)}" + (f" ({', '.join(passing)})." if passing else "."),
    ]
    return [*lines, ""]


def _misses(rows: list[Row]) -> list[str]:
    """Where each method's worst misses come from: the phases over their floor, the peak phase."""
    lines: list[str] = []
    methods = [m for m in dict.fromkeys(r.get("method") for r in rows) if m != BASELINE]
    for m in methods:
        ok = [r for r in rows if r.get("method") == m and r.get("status") == "ok"]
        slow = [r for r in ok if (r.get("efficiency") or 1.0) < EFFICIENCY_TARGET]
        big = [r for r in ok if (r.get("peak_over_floor") or 0.0) > MEMORY_TARGET]
        parts: list[str] = []
        if slow:
            r = min(slow, key=lambda r: r["efficiency"])
            measured, floor = r.get("phases_ms") or {}, r.get("floor_phases_ms") or {}
            top = [
                f"{p} {_ms(measured.get(p, 0.0))} vs {_ms(floor.get(p, 0.0))} ms"
                for _, p in _over_floor(r)[:2]
            ]
            parts.append(
                f"time: {len(slow)} below target, worst eff {_f(r['efficiency'])} at "
                f"{_where(r)}" + (f" (over the floor most: {', '.join(top)})" if top else "")
            )
        if big:
            r = max(big, key=lambda r: r["peak_over_floor"])
            phases = r.get("live_phases_mb") or {}
            peak_phase = max(phases, key=lambda p: phases[p]) if phases else None
            floor_mb = r.get("live_floor_mb", r.get("mem_floor_mb"))
            peak_mb = r.get("live_peak_mb", r.get("peak_mb"))
            excess = (
                f", {_f(float(peak_mb) - float(floor_mb), 1)} MB over its floor of "
                f"{_f(floor_mb, 1)} MB"
                if peak_mb is not None and floor_mb is not None
                else ""
            )
            parts.append(
                f"memory: {len(big)} above target, worst {_f(r['peak_over_floor'])} at "
                f"{_where(r)}" + (f" (peak during {peak_phase}{excess})" if peak_phase else excess)
            )
        if parts:
            lines.append(f"- **{m}**: " + "; ".join(parts) + ".")
    if not lines:
        return []
    return [
        "## Where the misses come from",
        "",
        "Per method, its worst configuration per target: the phases whose measured time "
        "exceeds their floor the most (amortised ms), and the phase during which live memory "
        "peaked. The per-configuration tables below have every phase.",
        "",
        *lines,
        "",
    ]


#: Operators named per phase in the profiles of the misses.
PROFILE_OPS = 4


def _over_floor(row: Row) -> list[tuple[float, str]]:
    """``(measured − floor, phase)`` of the phases above their floor, largest first."""
    measured, floor = row.get("phases_ms") or {}, row.get("floor_phases_ms") or {}
    over = ((measured.get(p, 0.0) - floor.get(p, 0.0), p) for p in FLOOR_PHASES)
    return sorted((x for x in over if x[0] > 0), reverse=True)


def _profiled_phase(row: Row, phase: str) -> str:
    """One phase of a row's operator profile: own time, Python time, top operators."""
    groups = row["op_profile"].get("groups") or {}
    names = [g for g in phase_groups(phase) if g in groups]
    if not names:
        return f"{phase}: not in the profile"
    ms = sum(float(groups[g]["ms"]) for g in names)
    python = sum(float(groups[g]["python_ms"]) for g in names)
    ops: dict[str, list[float]] = {}
    for g in names:
        for name, calls, self_ms in groups[g]["ops"]:
            entry = ops.setdefault(name, [0.0, 0.0])
            entry[0] += float(calls)
            entry[1] += float(self_ms)
    top = sorted(ops.items(), key=lambda item: -item[1][1])[:PROFILE_OPS]
    listed = ", ".join(f"`{name}` {_ms(v[1])} ({_f(v[0], 1)}×)" for name, v in top)
    return f"profiled {' + '.join(names)} {_ms(ms)} ms: Python and dispatch {_ms(python)}" + (
        f"; {listed}" if listed else ""
    )


def _profiles(rows: list[Row]) -> list[str]:
    """The operator profiles of the configurations below the efficiency target."""
    profiled = [r for r in rows if r.get("op_profile")]
    if not profiled:
        return []
    lines = [
        "## Operator profiles of the misses",
        "",
        "Each configuration below the efficiency target, profiled in one more worker "
        "(`--profile-misses`): for the (at most two) phases furthest above their floor, "
        "measured vs floor (amortised ms per step), then the same phase in the profile: its "
        "own time, the part outside any operator (Python and dispatch) and the operators "
        "with the most self time (ms and calls per step). Profiled phases run slower than "
        "timed ones (the profiler's own cost per operator): read a profile for where a "
        "phase's time goes, the timed columns for how long it takes. `rest` is the step "
        "outside the method's phases, `backward` the loss's backward with what the method "
        "adds to it. `op_profile` in results.jsonl has every group.",
        "",
    ]
    for r in profiled:
        head = f"- **{_config(r)}** (eff {_f(r.get('efficiency'))})"
        prof = r["op_profile"]
        if "error" in prof:
            lines.append(f"{head}: profile failed: {prof['error']}.")
            continue
        if "skipped" in prof:
            lines.append(f"{head}: not profiled: {prof['skipped']}.")
            continue
        measured, floor = r.get("phases_ms") or {}, r.get("floor_phases_ms") or {}
        parts = [
            f"{p} {_ms(measured.get(p, 0.0))} vs {_ms(floor.get(p, 0.0))} ms, "
            + _profiled_phase(r, p)
            for _, p in _over_floor(r)[:2]
        ]
        lines.append(
            f"{head}: " + ("; ".join(parts) if parts else "no phase above its floor") + "."
        )
    return [*lines, ""]


def _where(row: Row) -> str:
    return f"{row.get('model')} B={row.get('batch_size')} T={row.get('interval')}"


def _model_table(model: str, rows: list[Row]) -> list[str]:
    title = describe(model)
    lines = [
        f"## {model}: {title}",
        "",
        "| method | B | T | ms/step | thr × SGD | floor thr × SGD | eff | peak MB | mem × SGD "
        "| mem floor × SGD | peak / floor | RSS MB | RSS / floor | phases ms "
        "| floor phases ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(
        rows,
        key=lambda r: (
            r.get("batch_size") or 0,
            r.get("method") != BASELINE,
            str(r.get("method")),
            r.get("interval") or 0,
        ),
    )
    for r in order:
        t = "–" if r.get("method") == BASELINE else str(r.get("interval"))
        if r.get("status") != "ok":
            lines.append(
                f"| {r.get('method')} | {r.get('batch_size')} | {t} | {r.get('status')}: "
                f"{r.get('reason')} | | | | | | | | | | | |"
            )
            continue
        eff = r.get("efficiency")
        mark = (
            " ✗" if eff is not None and eff < EFFICIENCY_TARGET and r["method"] != BASELINE else ""
        )
        over = r.get("peak_over_floor", r.get("mem_over_floor"))
        mmark = " ✗" if over is not None and over > MEMORY_TARGET else ""
        peak = r.get("live_peak_mb") if r.get("memory_measure") == "live" else r.get("peak_mb")
        rss = r.get("mem_over_floor")
        dagger = " †" if r.get("contended") else ""
        dagger += " ‡" if r.get("capped") else ""
        dagger += " ÷" if r.get("diverged") else ""
        dagger += " §" if r.get("slow") else ""
        lines.append(
            f"| {r['method']} | {r['batch_size']} | {t} | {_ms(r.get('time_ms'))}{dagger} "
            f"| {_f(r.get('throughput_ratio'))} | {_f(r.get('floor_throughput_ratio'))} "
            f"| {_f(eff)}{mark} | {_f(peak, 1)} "
            f"| {_f(r.get('peak_ratio', r.get('mem_ratio')))} "
            f"| {_f(r.get('peak_floor_ratio', r.get('mem_floor_ratio')))} | {_f(over)}{mmark} "
            f"| {_f(r.get('peak_mb'), 1)} | {_f(rss)} "
            f"| {_phases(r.get('phases_ms'))} | {_phases(r.get('floor_phases_ms'))} |"
        )
    return [*lines, ""]


def _options_line(rows: list[Row]) -> list[str]:
    """The method options the rows ran with, where any differ from the defaults."""
    seen: dict[str, str] = {}
    for r in rows:
        opts = r.get("options")
        if opts:
            seen.setdefault(
                str(r.get("method")), ", ".join(f"{k}={v}" for k, v in sorted(opts.items()))
            )
    if not seen:
        return []
    parts = "; ".join(f"{m}: {o}" for m, o in sorted(seen.items()))
    return [f"Method options (besides the defaults and the grid's T): {parts}.", ""]


#: What makes a worker slow (:func:`precond.bench.runner.is_slow`), for the notes.
_SLOW_RULES = (
    f"their idle steps' forward/backward took more than {SLOW_LIMIT:g} × the SGD step timed in "
    f"the same worker, or that SGD step more than {BASELINE_SLOW_LIMIT:g} × the run's reference "
    "(a low quantile of every worker's SGD step of the same model and batch size), or the "
    f"worker's timings of the floor's kernels (all of them, or the factorisations alone) more "
    f"than {KERNEL_SLOW_LIMIT:g} × the run's reference"
)


def render_markdown(rows: list[Row], meta: Mapping[str, Any] | None = None) -> str:
    """The report as markdown.

    Args:
        rows: Rows with ratios attached.
        meta: ``spec``, ``env`` and ``elapsed_s`` of the run.

    Returns:
        The markdown text.
    """
    lines = _header(meta or {})
    lines += _options_line(rows)
    lines += _targets(rows)
    lines += _misses(rows)
    lines += _profiles(rows)
    for model in dict.fromkeys(r.get("model") for r in rows):
        lines += _model_table(str(model), [r for r in rows if r.get("model") == model])
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["## Missing points", ""]
        lines += [f"- {_config(r)}: {r.get('status')}: {r.get('reason')}" for r in failed]
        lines.append("")
    notes = sorted({w for r in rows for w in r.get("warnings") or []})
    notes += sorted({r["floor_note"] for r in rows if r.get("floor_note")})
    incomplete = [r for r in rows if r.get("missing_kinds")]
    contended = [r for r in rows if r.get("contended")]
    capped = [r for r in rows if r.get("capped")]
    impossible = [r for r in rows if (r.get("efficiency") or 0.0) > 1.1]
    diverged = [r for r in rows if r.get("diverged")]
    late = [r for r in rows if r.get("slow") and r.get("remeasure") == "deadline"]
    slow = [r for r in rows if r.get("slow") and r.get("remeasure") != "deadline"]
    remeasured = [r for r in rows if (r.get("attempts") or 1) > 1]
    repeated = [r for r in rows if (r.get("processes") or 1) > 1]
    short_of_workers = [r for r in rows if r.get("further") == "deadline"]
    if (
        notes
        or incomplete
        or contended
        or impossible
        or capped
        or diverged
        or slow
        or late
        or remeasured
        or repeated
        or short_of_workers
    ):
        lines += ["## Notes", ""]
        if impossible:
            lines.append(
                f"- {len(impossible)} configurations have an efficiency above 1.1 (e.g. "
                + ", ".join(f"{_config(r)}: {r['efficiency']:.2f}" for r in impossible[:3])
                + "): no step can beat its floor, so their floor or their step was measured "
                "under noise."
            )
        if contended:
            lines.append(
                f"- † {len(contended)} of {len(rows)} configurations were measured while other "
                "processes used the worker's cores (e.g. "
                + ", ".join(
                    f"{_config(r)}: {r.get('other_cores') or 0:.2f} cores" for r in contended[:3]
                )
                + "): their times are too high; rerun on an idle machine."
            )
        if remeasured:
            lines.append(
                f"- {len(remeasured)} configurations were measured again because their worker "
                "was contended or ran slow ("
                + ", ".join(f"{_config(r)}: {r['attempts']} attempts" for r in remeasured[:5])
                + "); the row kept is the least contended one that did not run slow."
            )
        if repeated:
            lines.append(_process_spread(repeated))
        if short_of_workers:
            fewest = min(int(r.get("processes") or 1) for r in short_of_workers)
            lines.append(
                f"- {len(short_of_workers)} configurations kept fewer workers than the others "
                f"(down to {fewest}; the run's time for further workers, `further_until_s`, "
                f"was spent), e.g. {_listed(short_of_workers)}: their rows are the median of "
                "fewer processes."
            )
        if slow:
            lines.append(
                f"- § {len(slow)} configurations ran slow in every attempt: {_SLOW_RULES} ("
                + _listed(slow)
                + "); their times are too high (the least slow attempt is kept)."
            )
        if late:
            lines.append(
                f"- § {len(late)} configurations ran slow and were not measured again: the "
                "run's time for re-measurements (`remeasure_until_s`) was spent ("
                + _listed(late)
                + f"). Slow means: {_SLOW_RULES}. Their times are too high."
            )
        if capped:
            lines.append(
                f"- ‡ {len(capped)} configurations reached the time budget of their timed steps "
                "(`--budget`) before every step kind had its samples ("
                + _listed(capped)
                + "): their medians rest on fewer samples."
            )
        if diverged:
            lines.append(
                f"- ÷ {len(diverged)} configurations diverged while they were timed (loss or "
                "parameters not finite at the end: "
                + _listed(diverged)
                + "): steps that skip work on non-finite statistics look cheaper than they are; "
                "rerun them with a larger damping (`--option METHOD.damping=...`)."
            )
        lines += [
            f"- {_config(r)}: no sample of step kind(s) {', '.join(r['missing_kinds'])} within "
            "the step budget (amortised over the kinds measured)"
            for r in incomplete
        ]
        lines += [f"- {w}" for w in notes[:20]]
        lines.append("")
    return "\n".join(lines)
