"""How busy the rest of the machine was while a configuration was measured.

Timings on shared cores are only as good as the share the benchmark got. With ``k`` threads
per worker on ``n`` cores, any other process using more than ``n - k`` cores slows the
measured steps, and OpenMP's spinning barriers make 2-thread kernels on one free core many
times slower, not twice. The worker records the cores that other processes used while it
timed steps and floor kernels (busy time of all CPUs from ``/proc/stat`` minus its own CPU
time, over the wall time); the report marks contended rows and the runner re-measures them.
"""

from __future__ import annotations

import os
import time

__all__ = ["ContentionMeter", "busy_cpu_seconds", "is_contended", "wait_until_idle"]

#: Other processes may use this many cores beyond the ones the worker leaves free.
CONTENTION_SLACK = 0.25


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processors spent busy since boot (``None`` without ``/proc/stat``)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal ...; steal is time the host took away.
    values = [int(v) for v in fields[1:9]]
    busy = values[0] + values[1] + values[2] + values[5] + values[6] + values[7]
    return busy / os.sysconf("SC_CLK_TCK")


class ContentionMeter:
    """Cores used by other processes between :meth:`start` and :meth:`stop`."""

    def __init__(self) -> None:
        self._busy: float | None = None
        self._own = 0.0
        self._wall = 0.0

    def start(self) -> None:
        """Begin the window."""
        self._busy = busy_cpu_seconds()
        self._own = time.process_time()
        self._wall = time.perf_counter()

    def stop(self) -> float | None:
        """End the window.

        Returns:
            Average number of cores other processes kept busy, or ``None`` if unknown or the
            window was too short (under half a second) for ``/proc/stat``'s resolution.
        """
        busy = busy_cpu_seconds()
        wall = time.perf_counter() - self._wall
        if busy is None or self._busy is None or wall < 0.5:
            return None
        own = time.process_time() - self._own
        return max(0.0, (busy - self._busy - own) / wall)


def is_contended(other_cores: float | None, threads: int, cpus: int | None = None) -> bool:
    """Whether other processes took cores the worker's threads needed.

    Args:
        other_cores: Cores other processes used on average (``None``: unknown, not contended).
        threads: Threads of the worker (0: all cores).
        cpus: Cores of the machine (default: ``os.cpu_count()``).

    Returns:
        ``True`` if the other processes used more than the free cores plus a small slack.
    """
    if other_cores is None:
        return False
    n = cpus or os.cpu_count() or 1
    free = max(0, n - (threads if threads > 0 else n))
    return other_cores > free + CONTENTION_SLACK


def wait_until_idle(threads: int, max_wait: float, window: float = 0.5) -> float | None:
    """Wait (at most ``max_wait`` seconds) for a window in which the worker would be alone.

    Args:
        threads: Threads the worker will use.
        max_wait: Seconds to wait at most (0: do not wait).
        window: Length of each observation.

    Returns:
        The other processes' load in the last window observed (``None`` if not measured).
    """
    deadline = time.perf_counter() + max_wait
    load = None
    while time.perf_counter() < deadline:
        meter = ContentionMeter()
        meter.start()
        time.sleep(window)
        load = meter.stop()
        if not is_contended(load, threads):
            break
    return load
