"""Peak memory of the running process, from a baseline taken after model and data exist.

On CUDA the probe reads the caching allocator's peak of allocated bytes. On a CPU there is no
allocator statistic, so it reads the kernel's accounting of the process: the high-water mark of
the resident set (``VmHWM`` in ``/proc/self/status``), which it resets at the baseline through
``/proc/self/clear_refs``, minus any growth of file-backed pages (code of libraries paged in
during the run, which is not data). Where ``/proc`` is unavailable it falls back to
``getrusage``'s ``ru_maxrss``, which cannot be reset (the growth is then a lower bound).

The numbers are only meaningful in a fresh process whose earlier work allocated little: that is
why the harness measures each configuration in its own subprocess.
"""

from __future__ import annotations

import re
import resource
import sys
from dataclasses import dataclass

import torch

__all__ = ["MemoryProbe", "MemoryReading", "read_status_kb", "tensor_mb"]

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
