"""PNG figures of a benchmark run (matplotlib, Agg backend).

``poster.png`` follows the ASDL poster: one column per model; row 1 the peak-memory ratio to
SGD against the batch size, row 2 the throughput ratio to SGD against the batch size at the
smallest interval (T=1), row 3 the throughput ratio against the interval at B=128 (or the
batch size nearest to it). Solid lines are measured, dashed lines the method's floor (what any
implementation could reach); configurations that failed are ``×`` marks on the axis, with the
reasons listed under the figure. ``targets.png`` shows the efficiency (floor / measured time)
per interval and the peak memory over its floor, with the targets as lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .problems import describe
from .ratios import BASELINE
from .report import EFFICIENCY_TARGET, MEMORY_TARGET

__all__ = ["poster_figure", "targets_figure", "write_figures"]

Row = dict[str, Any]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _ordered(rows: Sequence[Row], key: str) -> list[Any]:
    return list(dict.fromkeys(r.get(key) for r in rows))


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _nearest(values: Sequence[int], target: int) -> int | None:
    return min(values, key=lambda v: (abs(v - target), v)) if values else None


class _Panel:
    """Draws one method's measured and floor curves (and failed points) on one axis."""

    def __init__(self, ax: Any, color: Any, log_base: int) -> None:
        self.ax = ax
        self.color = color
        ax.set_xscale("log", base=log_base)

    def draw(
        self,
        rows: Sequence[Row],
        x_key: str,
        y_key: str,
        floor_key: str | None,
        missing: list[str],
    ) -> None:
        ok = sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: r[x_key])
        pts = [(r[x_key], r.get(y_key)) for r in ok if r.get(y_key) is not None]
        if pts:
            self.ax.plot(*zip(*pts), "-o", color=self.color, ms=4, lw=1.5)
        if floor_key:
            fl = [(r[x_key], r.get(floor_key)) for r in ok if r.get(floor_key) is not None]
            if fl:
                self.ax.plot(*zip(*fl), "--o", color=self.color, lw=1, ms=4, mfc="none", alpha=0.8)
        for r in rows:
            if r.get("status") != "ok":
                self.ax.plot(
                    r[x_key],
                    0.04,
                    "x",
                    color=self.color,
                    ms=8,
                    mew=2,
                    transform=self.ax.get_xaxis_transform(),
                    clip_on=False,
                )
                missing.append(
                    f"{r.get('method')} {r.get('model')} B={r.get('batch_size')} "
                    f"T={r.get('interval')}: {r.get('status')}: {r.get('reason')}"
                )


def _select(rows: Sequence[Row], **where: Any) -> list[Row]:
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def _legend(fig: Any, colors: dict[str, Any], floor: bool) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", ms=4, label=m) for m, c in colors.items()]
    if floor:
        handles.append(Line2D([], [], color="0.5", lw=1, label="SGD"))
        handles.append(
            Line2D([], [], color="k", ls="--", marker="o", mfc="none", ms=4, lw=1, label="floor")
        )
    else:
        handles.append(Line2D([], [], color="r", ls=":", lw=1, label="target"))
    handles.append(Line2D([], [], color="k", marker="x", ls="", label="failed"))
    ncol = max(1, min(len(handles), int(fig.get_figwidth() / 1.3)))
    fig.legend(handles=handles, loc="upper center", ncol=ncol, frameon=False, fontsize=8)


def _footnote(fig: Any, missing: list[str]) -> None:
    if not missing:
        return
    unique = list(dict.fromkeys(missing))
    text = "\n".join(
        unique[:12] + ([f"... and {len(unique) - 12} more"] if len(unique) > 12 else [])
    )
    fig.text(0.01, 0.005, text, fontsize=7, va="bottom", ha="left", family="monospace")


def _grid(n_rows: int, n_cols: int, missing_lines: int, n_legend: int) -> tuple[Any, Any]:
    plt = _plt()
    extra = 0.14 * min(missing_lines, 13)
    width = 3.6 * n_cols + 0.6
    legend_rows = math.ceil(n_legend / max(1, min(n_legend, int(width / 1.3))))
    head = 0.5 + 0.2 * legend_rows
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(width, 2.9 * n_rows + 0.4 + head + extra), squeeze=False
    )
    fig.subplots_adjust(
        top=1 - head / fig.get_figheight(),
        bottom=(0.5 + extra) / fig.get_figheight(),
        hspace=0.45,
        wspace=0.3,
    )
    return fig, axes


def poster_figure(rows: Sequence[Row], batch_ref: int = 128, interval_ref: int = 1) -> Any:
    """The ASDL-poster figure (3 rows × one column per model).

    Args:
        rows: Rows with ratios attached.
        batch_ref: Batch size of row 3 (the nearest one measured is used).
        interval_ref: Interval of rows 1 and 2 (the nearest one measured is used).

    Returns:
        The matplotlib figure.
    """
    models = _ordered(rows, "model")
    methods = [m for m in _ordered(rows, "method") if m != BASELINE]
    colors = _colors(methods)
    n_failed = sum(r.get("status") != "ok" for r in rows)
    fig, axes = _grid(3, max(len(models), 1), n_failed, len(methods) + 3)
    missing: list[str] = []
    for j, model in enumerate(models):
        mrows = _select(rows, model=model)
        intervals = sorted({r["interval"] for r in mrows if r.get("method") != BASELINE})
        batches = sorted({r["batch_size"] for r in mrows})
        t_ref = _nearest(intervals, interval_ref)
        b_ref = _nearest(batches, batch_ref)
        title = describe(str(model))
        axes[0][j].set_title(title, fontsize=9)
        for m in methods:
            sel = _select(mrows, method=m)
            _Panel(axes[0][j], colors[m], 2).draw(
                _select(sel, interval=t_ref),
                "batch_size",
                "peak_ratio",
                "peak_floor_ratio",
                missing,
            )
            _Panel(axes[1][j], colors[m], 2).draw(
                _select(sel, interval=t_ref),
                "batch_size",
                "throughput_ratio",
                "floor_throughput_ratio",
                missing,
            )
            _Panel(axes[2][j], colors[m], 10).draw(
                _select(sel, batch_size=b_ref),
                "interval",
                "throughput_ratio",
                "floor_throughput_ratio",
                missing,
            )
        labels = (
            f"peak memory / SGD (T={t_ref})",
            f"throughput / SGD (T={t_ref})",
            f"throughput / SGD (B={b_ref})",
        )
        for i, ax in enumerate(axes[:, j]):
            ax.axhline(1.0, color="0.5", lw=1, zorder=0)
            ax.set_xlabel("interval T" if i == 2 else "batch size B", fontsize=8)
            ax.set_ylim(bottom=0)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(labels[i], fontsize=8)
        _base_failures(_select(mrows, method=BASELINE), axes[0][j], missing)
    _legend(fig, colors, floor=True)
    _footnote(fig, missing)
    return fig


def _base_failures(rows: Sequence[Row], ax: Any, missing: list[str]) -> None:
    for r in rows:
        if r.get("status") != "ok":
            ax.plot(r["batch_size"], 0.04, "x", color="0.4", ms=8, mew=2,
                    transform=ax.get_xaxis_transform(), clip_on=False)  # fmt: skip
            missing.append(
                f"{BASELINE} {r.get('model')} B={r.get('batch_size')}: {r.get('status')}: "
                f"{r.get('reason')} (no ratios for this batch size)"
            )


def targets_figure(rows: Sequence[Row]) -> Any:
    """Efficiency per interval and peak memory over its floor, against the batch size.

    Args:
        rows: Rows with ratios attached.

    Returns:
        The matplotlib figure (one row per interval plus a memory row; one column per model).
    """
    models = _ordered(rows, "model")
    methods = [m for m in _ordered(rows, "method") if m != BASELINE]
    intervals = sorted({r["interval"] for r in rows if r.get("method") != BASELINE})
    colors = _colors(methods)
    n_failed = sum(r.get("status") != "ok" for r in rows)
    fig, axes = _grid(len(intervals) + 1, max(len(models), 1), n_failed, len(methods) + 2)
    missing: list[str] = []
    for j, model in enumerate(models):
        mrows = _select(rows, model=model)
        axes[0][j].set_title(describe(str(model)), fontsize=9)
        for m in methods:
            sel = _select(mrows, method=m)
            for i, t in enumerate(intervals):
                _Panel(axes[i][j], colors[m], 2).draw(
                    _select(sel, interval=t), "batch_size", "efficiency", None, missing
                )
            _Panel(axes[-1][j], colors[m], 2).draw(
                _select(sel, interval=intervals[0]), "batch_size", "peak_over_floor", None, missing
            )
        ylabel: Callable[[int], str] = lambda i: (  # noqa: E731
            f"efficiency (T={intervals[i]})" if i < len(intervals) else "peak / memory floor"
        )
        for i, ax in enumerate(axes[:, j]):
            target = EFFICIENCY_TARGET if i < len(intervals) else MEMORY_TARGET
            ax.axhline(target, color="r", lw=1, ls=":", zorder=0)
            ax.set_ylim(0, max(ax.get_ylim()[1], 1.1 if i < len(intervals) else 1.4))
            ax.set_xlabel("batch size B", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(ylabel(i), fontsize=8)
    _legend(fig, colors, floor=False)
    _footnote(fig, missing)
    return fig


def write_figures(rows: Sequence[Row], out_dir: str | Path) -> list[Path]:
    """Write ``poster.png`` and ``targets.png`` into ``out_dir``.

    Args:
        rows: Rows with ratios attached.
        out_dir: Directory.

    Returns:
        The files written (none when no configuration of a method was measured).
    """
    plt = _plt()
    if not any(r.get("method") != BASELINE for r in rows):
        return []
    out = Path(out_dir)
    paths = []
    for name, make in (("poster.png", poster_figure), ("targets.png", targets_figure)):
        fig = make(rows)
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
