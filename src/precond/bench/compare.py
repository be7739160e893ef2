"""Two runs of the benchmark side by side: what changed, and how much of it is noise.

``precond bench --compare BEFORE AFTER`` reads the ``results.jsonl`` of two output
directories and prints a markdown report: per configuration measured in both, the efficiency
before and after and the change; how many meet the targets in each run, in both and in
either; the median and the spread of the change; per method, the configurations meeting the
efficiency target; and the largest changes. Run twice on the same code it measures the
harness's noise (how far a configuration's efficiency moves with nothing changed); after a
change, the part of the difference above that noise.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .ratios import BASELINE
from .report import EFFICIENCY_TARGET, MEMORY_TARGET

__all__ = ["Pair", "compare_rows", "load_rows", "render_comparison"]

Row = dict[str, Any]
Key = tuple[str, str, int, int]


@dataclass(frozen=True)
class Pair:
    """One configuration measured in both runs.

    Attributes:
        key: ``(method, model, batch size, interval)``.
        eff: Efficiency before and after.
        mem: Peak memory over its floor before and after (``None`` where not measured).
    """

    key: Key
    eff: tuple[float, float]
    mem: tuple[float | None, float | None]

    @property
    def delta(self) -> float:
        """Efficiency after minus before."""
        return self.eff[1] - self.eff[0]


def load_rows(directory: str | Path) -> list[Row]:
    """The rows of a run's ``results.jsonl`` (written with their ratios attached).

    Args:
        directory: The run's output directory.

    Returns:
        Its rows.

    Raises:
        ValueError: If the directory has no ``results.jsonl``.
    """
    path = Path(directory, "results.jsonl")
    if not path.is_file():
        raise ValueError(f"Invalid run directory: {str(directory)!r}. It has no results.jsonl.")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _key(row: Row) -> Key:
    return (
        str(row.get("method")),
        str(row.get("model")),
        int(row.get("batch_size") or 0),
        int(row.get("interval") or 0),
    )


def _usable(rows: Iterable[Row]) -> dict[Key, Row]:
    return {
        _key(r): r
        for r in rows
        if r.get("method") != BASELINE
        and r.get("status") == "ok"
        and r.get("efficiency") is not None
    }


def _over(row: Row) -> float | None:
    value = row.get("peak_over_floor", row.get("mem_over_floor"))
    return None if value is None else float(value)


def compare_rows(before: Iterable[Row], after: Iterable[Row]) -> list[Pair]:
    """The configurations measured (status ok, with an efficiency) in both runs.

    Args:
        before: Rows of the first run (ratios attached).
        after: Rows of the second run.

    Returns:
        One pair per common configuration, in the order of ``after``.
    """
    a, b = _usable(before), _usable(after)
    return [
        Pair(k, (float(a[k]["efficiency"]), float(b[k]["efficiency"])), (_over(a[k]), _over(b[k])))
        for k in b
        if k in a
    ]


def _label(key: Key) -> str:
    method, model, batch, interval = key
    return f"{method} {model} B={batch} T={interval}"


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def render_comparison(
    pairs: list[Pair],
    names: tuple[str, str] = ("before", "after"),
    top: int = 15,
    envs: Mapping[str, Any] | None = None,
) -> str:
    """Markdown comparing two runs.

    Args:
        pairs: From :func:`compare_rows`.
        names: What to call the two runs.
        top: Largest changes listed.
        envs: Optional ``{name: env}`` of each run (its git commit and date are printed).

    Returns:
        The report.

    Raises:
        ValueError: If the runs have no configuration in common.
    """
    if not pairs:
        raise ValueError(
            "Invalid comparison: the two runs have no measured configuration in common."
        )
    x, y = names
    lines = [f"# precond bench: {x} vs {y}", ""]
    for name, env in (envs or {}).items():
        if env:
            lines.append(f"- {name}: git {env.get('git_commit')}, {env.get('date')}")
    if envs:
        lines.append("")
    deltas = [abs(p.delta) for p in pairs]
    meet = [(p.eff[0] >= EFFICIENCY_TARGET, p.eff[1] >= EFFICIENCY_TARGET) for p in pairs]
    n = len(pairs)
    mem_ok = [
        (m0 <= MEMORY_TARGET, m1 <= MEMORY_TARGET)
        for m0, m1 in (p.mem for p in pairs)
        if m0 is not None and m1 is not None
    ]
    lines += [
        f"{n} configurations measured in both runs.",
        "",
        f"| | {x} | {y} | both | either |",
        "|---|---|---|---|---|",
        f"| efficiency ≥ {EFFICIENCY_TARGET} | {sum(a for a, _ in meet)} "
        f"| {sum(b for _, b in meet)} | {sum(a and b for a, b in meet)} "
        f"| {sum(a or b for a, b in meet)} |",
    ]
    if mem_ok:
        lines.append(
            f"| memory ≤ {MEMORY_TARGET} × floor | {sum(a for a, _ in mem_ok)} "
            f"| {sum(b for _, b in mem_ok)} | {sum(a and b for a, b in mem_ok)} "
            f"| {sum(a or b for a, b in mem_ok)} |"
        )
    lines += [
        "",
        f"Change of efficiency ({y} − {x}): "
        f"median {statistics.median(p.delta for p in pairs):+.2f}; "
        f"|change| median {statistics.median(deltas):.2f}, 90th percentile "
        f"{_quantile(deltas, 0.9):.2f}, largest {max(deltas):.2f}; "
        f"{sum(d >= 0.1 - 1e-9 for d in deltas)} of {n} moved by 0.1 or more.",
        "",
        f"## Efficiency ≥ {EFFICIENCY_TARGET} per method",
        "",
        f"| method | configurations | {x} | {y} | median change |",
        "|---|---|---|---|---|",
    ]
    methods: dict[str, list[Pair]] = {}
    for p in pairs:
        methods.setdefault(p.key[0], []).append(p)
    for method, group in methods.items():
        lines.append(
            f"| {method} | {len(group)} | {sum(p.eff[0] >= EFFICIENCY_TARGET for p in group)} "
            f"| {sum(p.eff[1] >= EFFICIENCY_TARGET for p in group)} "
            f"| {statistics.median(p.delta for p in group):+.2f} |"
        )
    lines += [
        "",
        f"## Largest changes of efficiency (top {min(top, n)})",
        "",
        f"| configuration | {x} | {y} | change |",
        "|---|---|---|---|",
    ]
    for p in sorted(pairs, key=lambda p: -abs(p.delta))[:top]:
        lines.append(f"| {_label(p.key)} | {p.eff[0]:.2f} | {p.eff[1]:.2f} | {p.delta:+.2f} |")
    return "\n".join(lines) + "\n"
