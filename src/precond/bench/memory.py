"""Peak memory of the running process, from a baseline taken after model and data exist.

On CUDA the probe reads the caching allocator's peak of allocated bytes. On a CPU there is no
allocator statistic, so it reads the kernel's accounting of the process: the high-water mark of
the resident set (``VmHWM`` in ``/proc/self/status``), which it resets at the baseline through
``/proc/self/clear_refs``, minus any growth of file-backed pages (code of libraries paged in
during the run, which is not data). Where ``/proc`` is unavailable it falls back to
``getrusage``'s ``ru_maxrss``, which cannot be reset (the growth is then a lower bound).

The numbers are only meaningful in a fresh process whose earlier work allocated little: that is
why the harness measures each configuration in its own subprocess.

The resident set also holds memory that the C library's allocator keeps after it was freed
(glibc keeps freed heap blocks below its trim threshold, raises its mmap threshold to the size
of the largest freed block, and gives each thread that allocates its own arena), so a resident
peak exceeds the peak of live tensors by an amount that depends on the allocation history.
:class:`LiveTensorProbe` measures the other quantity: the peak of bytes held by CPU tensors
(PyTorch's CPU allocator's own count of allocated and not yet freed bytes), which no allocator
policy changes. See ``benchmarks/README.md`` for how the two compare on the CPU grid.
"""

from __future__ import annotations

import re
import resource
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "LiveReading",
    "LiveTensorProbe",
    "MemoryProbe",
    "MemoryReading",
    "read_status_kb",
    "tensor_mb",
]

_MB = 1024.0 * 1024.0


def read_status_kb(*keys: str) -> dict[str, int] | None:
    """Fields of ``/proc/self/status`` in kB (``None`` where the file does not exist).

    Args:
        *keys: Field names (``"VmRSS"``, ``"VmHWM"``, ``"RssFile"``).

    Returns:
        ``{key: kB}`` for the fields present, or ``None`` without ``/proc``.
    """
    try:
        with open("/proc/self/status") as f:
            text = f.read()
    except OSError:
        return None
    out = {}
    for key in keys:
        m = re.search(rf"^{key}:\s+(\d+)\s*kB", text, re.MULTILINE)
        if m:
            out[key] = int(m.group(1))
    return out


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


@dataclass
class MemoryReading:
    """What the probe saw.

    Attributes:
        growth_mb: Peak memory above the baseline.
        probe: How it was measured: ``"cuda"``, ``"vmhwm"`` or ``"maxrss"``.
        baseline_mb: The baseline itself (allocated bytes on CUDA, resident set on CPU).
    """

    growth_mb: float
    probe: str
    baseline_mb: float


class MemoryProbe:
    """Peak memory growth of this process between :meth:`start` and :meth:`read`.

    Args:
        device: Device whose memory is measured.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._base = 0
        self._file_base = 0
        self._kind = ""

    def start(self) -> None:
        """Reset the peak and take the baseline."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self._kind = "cuda"
            return
        status = read_status_kb("VmRSS", "RssFile")
        if status is not None and "VmRSS" in status and self._reset_hwm():
            self._base = status["VmRSS"] * 1024
            self._file_base = status.get("RssFile", 0) * 1024
            self._kind = "vmhwm"
            return
        self._base = max(_maxrss_bytes(), _current_rss_bytes())
        self._kind = "maxrss"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "5" resets the peak resident set size (Linux >= 4.0)
        except OSError:
            return False
        return True

    def read(self) -> MemoryReading:
        """The peak growth since :meth:`start`.

        Returns:
            The reading.
        """
        if self._kind == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            return MemoryReading((peak - self._base) / _MB, "cuda", self._base / _MB)
        if self._kind == "vmhwm":
            status = read_status_kb("VmHWM", "RssFile") or {}
            hwm = status.get("VmHWM", 0) * 1024
            file_growth = max(0, status.get("RssFile", 0) * 1024 - self._file_base)
            growth = max(0, hwm - self._base - file_growth)
            return MemoryReading(growth / _MB, "vmhwm", self._base / _MB)
        growth = max(0, _maxrss_bytes() - self._base)
        return MemoryReading(growth / _MB, "maxrss", self._base / _MB)


@dataclass
class LiveReading:
    """What :class:`LiveTensorProbe` saw.

    Attributes:
        peak_mb: Peak of live CPU tensor bytes above the level at :meth:`LiveTensorProbe.start`.
        end_mb: Live CPU tensor bytes above that level when the probe stopped.
        events: Allocations and frees counted.
        segments_mb: Peak above the start level within the stretches that follow each
            :meth:`LiveTensorProbe.mark` label (``{}`` without marks).
    """

    peak_mb: float
    end_mb: float
    events: int
    segments_mb: dict[str, float] = field(default_factory=dict)


#: Size of the marker allocations that delimit a :class:`LiveTensorProbe` window (bytes).
_MARK_BYTES = 4099


class LiveTensorProbe:
    """Peak bytes of live CPU tensor storage between :meth:`start` and :meth:`stop`.

    PyTorch's CPU allocator reports every allocation and free (address and size) while the
    profiler asks for memory events; the probe enables the profiler for memory events alone
    (its operator callbacks are limited to a scope that no operator uses, so operators are not
    recorded) and sums the sizes of the blocks allocated in the window and not yet freed.
    :meth:`mark` labels what follows (a phase of a step), and the reading gives the peak of
    each label too.

    Cheap while it runs (a map update per allocation), but each event is kept in memory
    (about 140 bytes) and :meth:`stop` builds the results (several kB per event): use it where
    the resident set is not being measured, and over few steps.

    What it counts: storage of CPU tensors allocated by PyTorch on threads that carry the
    profiler's thread-local state (the main thread and autograd's CPU work). Not counted:
    Python objects, the C library's own slack, buffers that MKL or oneDNN allocate themselves,
    and allocations made on other threads.
    """

    def __init__(self) -> None:
        self._active = False
        self._marks: list[tuple[int, str]] = []

    def start(self) -> bool:
        """Open the window.

        Returns:
            Whether the probe runs (not when another profiler is active or the private
            profiler API is missing).
        """
        try:
            from torch._C import _profiler as prof
            from torch._C._autograd import (
                _enable_profiler,
                _prepare_profiler,
                _profiler_enabled,
            )

            if _profiler_enabled():
                return False
            config = prof.ProfilerConfig(
                prof.ProfilerState.KINETO,
                False,  # report_input_shapes
                True,  # profile_memory
                False,  # with_stack
                False,  # with_flops
                False,  # with_modules
                prof._ExperimentalConfig(),
            )
            activities = {prof.ProfilerActivity.CPU}
            _prepare_profiler(config, activities)
            # Operator callbacks only for a scope no operator has: memory events alone.
            scopes = {prof.RecordScope.STATIC_RUNTIME_MODEL}
            _enable_profiler(config, activities, scopes)  # type: ignore[call-arg]
        except Exception:  # pragma: no cover - depends on torch's private API
            return False
        self._active = True
        self._marks = []
        self.mark("")
        return True

    def mark(self, label: str) -> None:
        """Label what follows (until the next mark) as ``label``.

        A marker allocation of :data:`_MARK_BYTES` bytes, freed at once, stands in the event
        stream for the mark; it is recognised by its address and size.
        """
        if not self._active:
            return
        marker = torch.empty(_MARK_BYTES, dtype=torch.uint8)
        self._marks.append((marker.data_ptr(), label))
        del marker

    def stop(self) -> LiveReading | None:
        """Close the window.

        Returns:
            The reading, or ``None`` if the probe did not run or saw no event.
        """
        if not self._active:
            return None
        self._active = False
        try:
            from torch._C import _profiler as prof
            from torch._C._autograd import _disable_profiler

            result = _disable_profiler()
            stack = list(result.experimental_event_tree())
            events: list[tuple[int, int, int]] = []
            while stack:
                event = stack.pop()
                stack.extend(event.children)
                if event.tag == prof._EventType.Allocation:
                    fields: Any = event.extra_fields
                    if fields.device.type == "cpu":
                        events.append((event.start_time_ns, fields.alloc_size, fields.ptr))
        except Exception:  # pragma: no cover - depends on torch's private API
            return None
        return _read_events(sorted(events, key=lambda e: e[0]), self._marks)


def _read_events(
    events: list[tuple[int, int, int]], marks: list[tuple[int, str]]
) -> LiveReading | None:
    """Peak, end and per-label peaks from ``(time, size, ptr)`` events in time order.

    The level is a running sum of the window's own allocations and their frees: a free of a
    block allocated before the window is not an event, and one whose address the allocator's
    table still holds from an earlier window (a stale entry: a block freed while no profiler
    ran) is ignored, so several windows in one process do not disturb each other.
    """
    pending = list(marks)
    level = 0
    started = False
    label = ""
    peak = 0
    segments: dict[str, int] = {}
    live: dict[int, int] = {}
    counted = 0
    for _, size, ptr in events:
        if pending and size == _MARK_BYTES and ptr == pending[0][0]:
            label = pending.pop(0)[1]
            started = True
            continue
        if not started:
            continue  # before the window opened
        if size > 0:
            live[ptr] = size
            level += size
        elif ptr in live and live[ptr] == -size:
            del live[ptr]
            level += size
        else:
            continue  # the marker's own free, or a block from before the window
        counted += 1
        peak = max(peak, level)
        if label:
            segments[label] = max(segments.get(label, 0), level)
    if not started:
        return None
    return LiveReading(peak / _MB, level / _MB, counted, {k: v / _MB for k, v in segments.items()})


def _current_rss_bytes() -> int:
    status = read_status_kb("VmRSS")
    if status and "VmRSS" in status:
        return status["VmRSS"] * 1024
    return 0


def tensor_mb(*tensors: torch.Tensor) -> float:
    """Megabytes held by ``tensors``' storage (for the model and data part of a peak).

    Args:
        *tensors: Tensors.

    Returns:
        Their size in MB.
    """
    return sum(t.numel() * t.element_size() for t in tensors) / _MB
