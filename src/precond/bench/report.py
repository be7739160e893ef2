"""Markdown report of a benchmark run: environment, targets, one table per model, failures."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .floor import FLOOR_PHASES
from .problems import PROBLEMS
from .ratios import BASELINE

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
        memory: Maximum peak / memory floor.

    Returns:
        ``{"config", "target", "value", "by"}`` per miss (``by`` is the shortfall or excess).
    """
    misses = []
    for r in rows:
        if r.get("method") == BASELINE or r.get("status") != "ok":
            continue
        eff, over = r.get("efficiency"), r.get("mem_over_floor")
        if eff is not None and eff < efficiency:
            misses.append(
                {"config": _config(r), "target": "efficiency", "value": eff, "by": efficiency - eff}
            )
        if over is not None and over > memory:
            misses.append(
                {"config": _config(r), "target": "memory", "value": over, "by": over - memory}
            )
    return misses


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
            f"kind ({spec.get('rare_repeats')} for update steps when T > 1).",
            "",
        ]
    if "elapsed_s" in meta:
        lines += [_wall_time(meta), ""]
    lines += [
        "Columns: *ms/step* is the median time per step amortised over the interval "
        "(Σ over step kinds of frequency × median); *thr* ratios are SGD's time / time "
        "(throughput relative to SGD measured in the same run; *floor thr* is what any "
        "implementation could reach on this machine); *eff* = floor / measured time; *peak* is "
        "the peak memory (model, data and peak growth of the resident set in a fresh process); "
        "*mem floor* is SGD's peak plus the state and transient buffers the method's math must "
        "keep; *live* is the peak of live tensor bytes (model, data and the peak growth counted "
        "by PyTorch's CPU allocator, without the C allocator's retained memory) and *live / "
        "floor* divides it by SGD's live peak plus the same state and transients; phases are "
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
            f"{acc.get('startup', 0.0) / 60:.1f} min)"
        )
    return text + "."


def _targets(rows: list[Row]) -> list[str]:
    methods = [m for m in dict.fromkeys(r.get("method") for r in rows) if m != BASELINE]
    lines = [
        f"## Targets: efficiency ≥ {EFFICIENCY_TARGET}, peak ≤ {MEMORY_TARGET} × memory floor",
        "",
        "| method | configs | min eff (where) | eff misses | max peak/floor (where) "
        "| memory misses | max live/floor (where) | live misses |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        ok = [r for r in rows if r.get("method") == m and r.get("status") == "ok"]
        total = sum(r.get("method") == m for r in rows)
        effs = [r for r in ok if r.get("efficiency") is not None]
        mems = [r for r in ok if r.get("mem_over_floor") is not None]
        worst_e = min(effs, key=lambda r: r["efficiency"]) if effs else None
        worst_m = max(mems, key=lambda r: r["mem_over_floor"]) if mems else None
        n_e = sum(r["efficiency"] < EFFICIENCY_TARGET for r in effs)
        n_m = sum(r["mem_over_floor"] > MEMORY_TARGET for r in mems)
        lives = [r for r in ok if r.get("live_over_floor") is not None]
        worst_l = max(lives, key=lambda r: r["live_over_floor"]) if lives else None
        n_l = sum(r["live_over_floor"] > MEMORY_TARGET for r in lives)
        we = f"{_f(worst_e['efficiency'])} ({_config(worst_e)})" if worst_e else "—"
        wm = f"{_f(worst_m['mem_over_floor'])} ({_config(worst_m)})" if worst_m else "—"
        wl = f"{_f(worst_l['live_over_floor'])} ({_config(worst_l)})" if worst_l else "—"
        lines.append(
            f"| {m} | {len(ok)}/{total} | {we} | {n_e} | {wm} | {n_m} | {wl} "
            f"| {n_l if lives else '—'} |"
        )
    return [*lines, ""]


def _model_table(model: str, rows: list[Row]) -> list[str]:
    title = PROBLEMS[model].description if model in PROBLEMS else model
    lines = [
        f"## {model}: {title}",
        "",
        "| method | B | T | ms/step | thr × SGD | floor thr × SGD | eff | peak MB | mem × SGD "
        "| mem floor × SGD | peak / floor | live MB | live / floor | phases ms "
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
        over = r.get("mem_over_floor")
        mmark = " ✗" if over is not None and over > MEMORY_TARGET else ""
        live = r.get("live_over_floor")
        lmark = " ✗" if live is not None and live > MEMORY_TARGET else ""
        dagger = " †" if r.get("contended") else ""
        dagger += " ‡" if r.get("capped") else ""
        lines.append(
            f"| {r['method']} | {r['batch_size']} | {t} | {_ms(r.get('time_ms'))}{dagger} "
            f"| {_f(r.get('throughput_ratio'))} | {_f(r.get('floor_throughput_ratio'))} "
            f"| {_f(eff)}{mark} | {_f(r.get('peak_mb'), 1)} | {_f(r.get('mem_ratio'))} "
            f"| {_f(r.get('mem_floor_ratio'))} | {_f(over)}{mmark} "
            f"| {_f(r.get('live_peak_mb'), 1)} | {_f(live)}{lmark} "
            f"| {_phases(r.get('phases_ms'))} | {_phases(r.get('floor_phases_ms'))} |"
        )
    return [*lines, ""]


def render_markdown(rows: list[Row], meta: Mapping[str, Any] | None = None) -> str:
    """The report as markdown.

    Args:
        rows: Rows with ratios attached.
        meta: ``spec``, ``env`` and ``elapsed_s`` of the run.

    Returns:
        The markdown text.
    """
    lines = _header(meta or {})
    lines += _targets(rows)
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
    if notes or incomplete or contended or impossible or capped:
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
        if capped:
            lines.append(
                f"- ‡ {len(capped)} configurations reached the time budget of their timed steps "
                "(`--budget`) before every step kind had its samples ("
                + ", ".join(_config(r) for r in capped[:5])
                + "): their medians rest on fewer samples."
            )
        lines += [
            f"- {_config(r)}: no sample of step kind(s) {', '.join(r['missing_kinds'])} within "
            "the step budget (amortised over the kinds measured)"
            for r in incomplete
        ]
        lines += [f"- {w}" for w in notes[:20]]
        lines.append("")
    return "\n".join(lines)
