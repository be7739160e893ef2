"""The environment a benchmark ran in, recorded with every result row."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["collect_environment", "cpu_model", "git_commit"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the git work tree holding ``path`` (``+dirty`` if it has changes).

    Args:
        path: A path inside the work tree (default: this package's source).

    Returns:
        ``"<sha>"`` or ``"<sha>+dirty"``, or ``None`` outside a git work tree.
    """
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{sha}+dirty" if dirty else sha


def collect_environment(
    device: str, threads: int, argv: Sequence[str] | None = None
) -> dict[str, Any]:
    """Torch version, device, threads, git commit, CPU, date and command line.

    Args:
        device: The benchmark's device.
        threads: Intra-op threads of the workers (0: torch's default).
        argv: The command line (default: ``sys.argv``).

    Returns:
        The record.
    """
    dev = torch.device(device)
    name = cpu_model()
    if dev.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(dev)
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(dev),
        "device_name": name,
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "threads": threads if threads > 0 else torch.get_num_threads(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(list(sys.argv if argv is None else argv)),
    }
