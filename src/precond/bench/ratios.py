"""Ratios to SGD measured in the same run, the floor, and the efficiency of each row.

A row is a dict (one configuration; see :mod:`precond.bench.runner`). The SGD reference of a
row is the row of the baseline method (``plain``) with the same model, batch size and device;
its time is replaced by ``sgd_in_process_ms`` where the worker timed SGD steps in the method's
own process (process-to-process differences, 10-30% on a CPU, then cancel in the ratios).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .floor import amortised_floor, memory_floor_mb

__all__ = ["BASELINE", "HEADLINE_MEMORY", "attach_ratios", "safe_div"]

#: The registry name of the SGD baseline.
BASELINE = "plain"

Row = dict[str, Any]


def safe_div(a: float | None, b: float | None) -> float | None:
    """``a / b``, or ``None`` when either is missing or ``b`` is not positive."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _key(row: Row) -> tuple[Any, ...]:
    return (row.get("model"), row.get("batch_size"), row.get("device"))


def attach_ratios(rows: Iterable[Row], baseline: str = BASELINE) -> list[Row]:
    """Fill the SGD-relative fields of every row (in place) and return the rows.

    Fields written: ``sgd_time_ms``, ``sgd_peak_mb``, ``time_ratio`` (time / SGD's),
    ``throughput_ratio`` (SGD's / time), ``floor_ms``, ``floor_phases_ms``,
    ``floor_throughput_ratio`` (SGD's / floor), ``efficiency`` (floor / time), ``mem_ratio``
    (peak / SGD's), ``mem_floor_mb``, ``mem_floor_ratio`` (floor / SGD's),
    ``mem_over_floor`` (peak / floor), and the same for live tensor bytes:
    ``sgd_live_peak_mb``, ``live_floor_mb`` (SGD's live peak + state + transients) and
    ``live_over_floor``, ``live_ratio`` (live peak / SGD's), ``live_floor_ratio``. The
    headline memory fields take the live-tensor numbers where both the row and its SGD row
    have them (the resident-set numbers otherwise): ``memory_measure`` (``"live"`` or
    ``"rss"``), ``peak_ratio``, ``peak_floor_ratio`` and ``peak_over_floor``. Fields that
    cannot be computed (a failed row, or no SGD row) are ``None``.

    Args:
        rows: Rows with ``time_ms``, ``peak_mb``, ``floor_costs_ms``, ``state_mb``,
            ``transient_mb`` and ``interval`` (failed rows may lack them).
        baseline: Method whose rows are the reference.

    Returns:
        The rows.
    """
    rows = list(rows)
    ref = {
        _key(r): r
        for r in rows
        if r.get("method") == baseline and r.get("status") == "ok" and r.get("time_ms")
    }
    for row in rows:
        base = ref.get(_key(row))
        sgd_ms = base.get("time_ms") if base else None
        sgd_mb = base.get("peak_mb") if base else None
        if row.get("sgd_in_process_ms"):  # timed in the method's own process: steadier ratios
            sgd_ms = row["sgd_in_process_ms"]
        row["sgd_time_ms"] = sgd_ms
        row["sgd_peak_mb"] = sgd_mb
        ok = row.get("status") == "ok"
        time_ms = row.get("time_ms") if ok else None
        peak = row.get("peak_mb") if ok else None
        row["time_ratio"] = safe_div(time_ms, sgd_ms)
        row["throughput_ratio"] = safe_div(sgd_ms, time_ms)
        if sgd_ms is not None and ok:
            interval = int(row.get("interval") or 1)
            floor = amortised_floor(sgd_ms, row.get("floor_costs_ms") or {}, interval, interval)
            row["floor_ms"] = floor.pop("total")
            row["floor_phases_ms"] = floor
        else:
            row["floor_ms"] = None
            row["floor_phases_ms"] = None
        row["floor_throughput_ratio"] = safe_div(sgd_ms, row["floor_ms"])
        row["efficiency"] = safe_div(row["floor_ms"], time_ms)
        row["mem_ratio"] = safe_div(peak, sgd_mb)
        if sgd_mb is not None and ok:
            row["mem_floor_mb"] = memory_floor_mb(
                sgd_mb, row.get("state_mb") or 0.0, row.get("transient_mb") or 0.0
            )
        else:
            row["mem_floor_mb"] = None
        row["mem_floor_ratio"] = safe_div(row["mem_floor_mb"], sgd_mb)
        row["mem_over_floor"] = safe_div(peak, row["mem_floor_mb"])
        sgd_live = base.get("live_peak_mb") if base else None
        live = row.get("live_peak_mb") if ok else None
        row["sgd_live_peak_mb"] = sgd_live
        row["live_floor_mb"] = (
            memory_floor_mb(sgd_live, row.get("state_mb") or 0.0, row.get("transient_mb") or 0.0)
            if sgd_live is not None and ok
            else None
        )
        row["live_over_floor"] = safe_div(live, row["live_floor_mb"])
        row["live_ratio"] = safe_div(live, sgd_live)
        row["live_floor_ratio"] = safe_div(row["live_floor_mb"], sgd_live)
        _headline_memory(row)
    return rows


#: Headline memory fields and their sources: (live-tensor field, resident-set field).
HEADLINE_MEMORY = {
    "peak_ratio": ("live_ratio", "mem_ratio"),
    "peak_floor_ratio": ("live_floor_ratio", "mem_floor_ratio"),
    "peak_over_floor": ("live_over_floor", "mem_over_floor"),
}


def _headline_memory(row: Row) -> None:
    """The headline memory of a row: live tensor bytes if measured, else the resident set.

    Live tensor bytes count what the method holds (PyTorch's CPU allocator's allocated and not
    yet freed bytes); the resident set adds what the C library's allocator keeps after frees,
    which depends on the allocation history rather than on the method (see
    :mod:`precond.bench.memory`), so it stays a secondary column.
    """
    live = row.get("live_over_floor") is not None
    rss = row.get("mem_over_floor") is not None
    row["memory_measure"] = "live" if live else ("rss" if rss else None)
    for name, (live_key, rss_key) in HEADLINE_MEMORY.items():
        row[name] = row.get(live_key if live else rss_key)
