"""Timing the kernels of a :class:`~precond.methods.cost.CostModel` at their shapes.

Each kernel is run on random inputs of its shape and dtype on the benchmark's device until
``min_time`` seconds have passed (at least ``min_reps`` runs after one warm-up run), and the
median run time is kept. Results are cached by ``(kind, shape, dtype)``; the runner can pass
the cache from one configuration's subprocess to the next (``share_kernel_timings``).

With ``cold`` the caches are evicted before each run: a buffer twice the size of the
last-level cache is overwritten (untimed), so the kernel reads its inputs from memory, as a
preconditioner's state often is between two steps (applying Shampoo's 1024 × 1024 roots to a
10-row gradient on this machine: 0.9 ms warm, 1.6 ms cold and inside a step). It is off by
default: the floor is a lower bound, and vectors reused within a phase (conjugate gradient's)
stay in the cache, where a cold timing overstates them (Hessian-free's floor on cnn_small
then exceeded its measured curvature phase by 50%).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ..linalg.solvers import damped_factor
from ..methods.cost import KernelOp

__all__ = [
    "KNOWN_KINDS",
    "KernelTimer",
    "cache_flusher",
    "kernel_key",
    "last_level_cache_bytes",
    "make_kernel",
]

#: Kernel kinds the timer can run (``backward``/``hvp`` are measured on the model instead).
KNOWN_KINDS = (
    "matmul",
    "bmm",
    "cholesky",
    "cholesky_inverse",
    "eigh",
    "eigvalsh",
    "qr",
    "elementwise",
    "randn",
)


def kernel_key(kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> str:
    """Cache key of a kernel: ``"bmm[1,512,128,512]:float32"``."""
    return f"{kind}[{','.join(str(int(s)) for s in shape)}]:{str(dtype).replace('torch.', '')}"


def _spd(b: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.randn(b, n, n, dtype=dtype, device=device)
    return x @ x.mT / n + torch.eye(n, dtype=dtype, device=device)


def make_kernel(
    kind: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Callable[[], object]:
    """A closure running one kernel on freshly allocated random inputs.

    Args:
        kind: One of :data:`KNOWN_KINDS`.
        shape: Its shape parameters (see :mod:`precond.methods.cost`).
        dtype: Precision.
        device: Device.

    Returns:
        The closure.

    Raises:
        ValueError: For an unknown kind or a shape of the wrong length.
    """
    lengths = {"matmul": 3, "bmm": 4, "elementwise": 1, "randn": 1}
    expected = lengths.get(kind, 2)
    if kind not in KNOWN_KINDS:
        raise ValueError(f"Invalid kernel kind: {kind!r}. Supported: {KNOWN_KINDS}.")
    if len(shape) != expected:
        raise ValueError(
            f"Invalid shape: {tuple(shape)}. A {kind!r} kernel takes {expected} sizes."
        )

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, dtype=dtype, device=device)

    if kind == "matmul":
        m, k, n = shape
        a, b, c = randn(m, k), randn(k, n), randn(m, n)
        return lambda: torch.mm(a, b, out=c)
    if kind == "bmm":
        g, m, k, n = shape
        a, b, c = randn(g, m, k), randn(g, k, n), randn(g, m, n)
        return lambda: torch.bmm(a, b, out=c)
    if kind == "elementwise":
        x = randn(shape[0])
        y = torch.empty_like(x)
        return lambda: torch.mul(x, 0.5, out=y)
    if kind == "randn":
        out = torch.empty(shape[0], dtype=dtype, device=device)
        return out.normal_
    batch, n = shape
    if kind == "qr":
        q = randn(batch, n, n)
        return lambda: torch.linalg.qr(q)
    spd = _spd(batch, n, dtype, device)
    if kind == "cholesky":
        # as the methods factorise: a damped copy, factorised where it lies (at a padded order
        # on a CPU, see precond.linalg.solvers.damped_buffer)
        return lambda: damped_factor(spd, 0.0)
    if kind == "cholesky_inverse":
        chol = damped_factor(spd, 0.0)
        assert chol is not None
        return lambda: torch.cholesky_inverse(chol)
    if kind == "eigvalsh":
        return lambda: torch.linalg.eigvalsh(spd)
    return lambda: torch.linalg.eigh(spd)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Cache size assumed where the device does not report it.
_DEFAULT_CACHE_BYTES = 32 << 20


def _size_bytes(text: str) -> int:
    """Bytes of a sysfs cache size such as ``"32768K"`` or ``"8M"`` (0 if unreadable)."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text.rstrip("KMG")
    return int(digits) * scale if digits.isdigit() else 0


def last_level_cache_bytes(
    device: torch.device | str = "cpu", sysfs: str = "/sys/devices/system/cpu/cpu0/cache"
) -> int:
    """The size of the device's last-level cache in bytes.

    Args:
        device: Device (CUDA: the L2 cache; CPU: the largest cache listed by Linux's sysfs).
        sysfs: Where Linux lists the CPU's caches.

    Returns:
        Bytes; 32 MiB where the size cannot be read.
    """
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or _DEFAULT_CACHE_BYTES)
    sizes = [_size_bytes(f.read_text()) for f in Path(sysfs).glob("index*/size") if f.is_file()]
    return max(sizes, default=0) or _DEFAULT_CACHE_BYTES


def cache_flusher(device: torch.device | str = "cpu") -> Callable[[], None]:
    """A closure that evicts the device's caches by overwriting twice their size.

    Args:
        device: Device.

    Returns:
        The closure (it holds its buffer; drop it to free the memory).
    """
    device = torch.device(device)
    buffer = torch.empty(2 * last_level_cache_bytes(device) // 4, device=device)
    count = [0]

    def flush() -> None:
        count[0] += 1
        buffer.fill_(float(count[0] % 7))

    return flush


def time_callable(
    fn: Callable[[], object],
    device: torch.device,
    *,
    min_time: float = 0.02,
    min_reps: int = 3,
    max_reps: int = 100,
    flush: Callable[[], None] | None = None,
) -> float:
    """Median seconds of ``fn`` after one warm-up call.

    Runs until ``min_time`` seconds have passed and at least ``min_reps`` runs (two when a run
    takes more than ten times ``min_time``) or ``max_reps`` runs are done.

    Args:
        fn: What to time.
        device: Its device (synchronised around each run on CUDA).
        min_time: Seconds to spend at least.
        min_reps: Runs to do at least.
        max_reps: Runs to do at most.
        flush: Called before each timed run, untimed (e.g. :func:`cache_flusher`).

    Returns:
        The median run time in seconds.
    """
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    if first > 10 * min_time:
        min_reps = min(min_reps, 2)
    times: list[float] = []
    spent = 0.0
    while len(times) < max_reps and (len(times) < min_reps or spent < min_time):
        if flush is not None:
            flush()
            _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return statistics.median(times)


class KernelTimer:
    """Times kernels at given shapes on one device, with a cache.

    Args:
        device: Device.
        cache: Previously measured ``{kernel_key: seconds}`` (shared between subprocesses).
        min_time: Seconds spent per kernel at least.
        cold: Evict the caches before each run (see the module's docstring); at most
            :attr:`COLD_REPS` runs per kernel then.
    """

    #: Runs per kernel at most when the caches are flushed before each (a flush costs a
    #: pass over twice the last-level cache).
    COLD_REPS = 11

    def __init__(
        self,
        device: torch.device | str = "cpu",
        cache: dict[str, float] | None = None,
        min_time: float = 0.02,
        cold: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.cache: dict[str, float] = dict(cache or {})
        self.new: dict[str, float] = {}
        self.min_time = min_time
        self.cold = cold
        self._flush: Callable[[], None] | None = None

    def _flusher(self) -> Callable[[], None] | None:
        if self.cold and self._flush is None:
            self._flush = cache_flusher(self.device)
        return self._flush

    def release(self) -> None:
        """Free the flush buffer (timings stay cached)."""
        self._flush = None

    def seconds(self, op: KernelOp) -> float:
        """Seconds of one run of ``op``'s kernel (``op.count`` is not applied).

        Args:
            op: The kernel.

        Returns:
            Median run time in seconds.

        Raises:
            ValueError: For a kind the timer cannot run.
        """
        key = kernel_key(op.kind, op.shape, op.dtype)
        if key not in self.cache:
            if any(s <= 0 for s in op.shape):
                self.cache[key] = 0.0
            else:
                fn = make_kernel(op.kind, op.shape, op.dtype, self.device)
                self.cache[key] = time_callable(
                    fn,
                    self.device,
                    min_time=self.min_time,
                    max_reps=self.COLD_REPS if self.cold else 100,
                    flush=self._flusher(),
                )
                del fn
            self.new[key] = self.cache[key]
        return self.cache[key]
