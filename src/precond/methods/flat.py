"""Flat coordinates of a list of parameters, shared by the Hessian/GGN methods.

See :mod:`precond.methods.second_order`: every vector of those methods is the preconditioned
parameters flattened and concatenated in order.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ParamVector", "aligned_rows", "all_finite", "row", "stack_rows"]


class ParamVector:
    """Flat views of a list of parameters (coordinates: parameters flattened in order).

    Args:
        params: The parameters.
    """

    #: Elements per chunk of :meth:`dot_params` (its temporaries: the chunk's products and
    #: their float64 copy).
    _DOT_CHUNK = 1 << 18

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.numel = sum(self.sizes)
        #: ``(start, stop)`` of each parameter's slot in a flat vector.
        self.spans: list[tuple[int, int]] = []
        start = 0
        for n in self.sizes:
            self.spans.append((start, start + n))
            start += n
        self._masks: dict[tuple[int, int, tuple[bool, ...]], Tensor] = {}

    def active(self) -> list[bool]:
        """Whether each parameter is trained now (``requires_grad``; no host sync)."""
        return [p.requires_grad for p in self.params]

    def mask(self, start: int = 0, stop: int | None = None) -> Tensor | None:
        """Coordinates of the trained parameters among ``params[start:stop]``, as a bool vector.

        Returns ``None`` when all of them are trained (the common case: callers then skip
        masking altogether). Masks are cached per frozen pattern.
        """
        stop = len(self.params) if stop is None else stop
        flags = tuple(p.requires_grad for p in self.params[start:stop])
        if all(flags):
            return None
        key = (start, stop, flags)
        if key not in self._masks:
            ref = self.params[0]
            self._masks[key] = torch.cat(
                [
                    torch.full((n,), on, dtype=torch.bool, device=ref.device)
                    for n, on in zip(self.sizes[start:stop], flags)
                ]
            )
        return self._masks[key]

    def empty(self, *rows: int, dtype: torch.dtype) -> Tensor:
        """An uninitialised ``[*rows, P]`` tensor on the parameters' device.

        Stacked rows are aligned (see :func:`aligned_rows`): each row starts on a 64-byte
        boundary, so kernels reading two rows at once run at full speed.
        """
        return aligned_rows(rows, self.numel, dtype, self.params[0].device)

    def views(self, vec: Tensor) -> list[Tensor]:
        """Parameter-shaped views of a flat vector ``[P]`` (no copy, ``vec``'s dtype)."""
        return [vec[a:b].view(p.shape) for (a, b), p in zip(self.spans, self.params)]

    def flatten_into(self, tensors: list[Tensor | None], out: Tensor) -> Tensor:
        """Copy parameter-shaped tensors (``None`` counts as zeros) into the flat ``out``.

        One concatenation when every tensor is present, contiguous and of ``out``'s dtype
        (on the benchmarks' MLP, 45 µs instead of 57 µs for a copy per parameter), else a
        copy per parameter.
        """
        if all(
            t is not None and t.dtype == out.dtype and t.is_contiguous() for t in tensors
        ) and len(tensors) == len(self.params):
            torch.cat([t.detach().view(-1) for t in tensors if t is not None], out=out)
            return out
        for o, t in zip(self.views(out), tensors):
            if t is None:
                o.zero_()
            else:
                o.copy_(t.detach())
        return out

    def flatten(self, tensors: list[Tensor | None], dtype: torch.dtype) -> Tensor:
        """Concatenate parameter-shaped tensors (``None`` counts as zeros) into a new ``[P]``."""
        return self.flatten_into(tensors, self.empty(dtype=dtype))

    def unflatten(self, vec: Tensor) -> list[Tensor]:
        """Split ``[P]`` into parameter-shaped tensors in the parameters' dtypes."""
        return [c.to(p.dtype) for c, p in zip(self.views(vec), self.params)]

    def grads(self, dtype: torch.dtype) -> Tensor:
        """The current ``p.grad`` as a flat vector.

        Zeros where ``p.grad`` is ``None`` or the parameter is frozen.
        """
        return self.flatten([p.grad if p.requires_grad else None for p in self.params], dtype)

    def trained_grads(self) -> list[tuple[Tensor, int, int]]:
        """``(p.grad, start, stop)`` of the trained parameters that have a gradient."""
        return [
            (p.grad, a, b)
            for p, (a, b) in zip(self.params, self.spans)
            if p.grad is not None and p.requires_grad
        ]

    def write_grads(self, vec: Tensor) -> None:
        """Copy a flat vector into ``p.grad``.

        Frozen parameters and parameters without a gradient are left alone.
        """
        for g, a, b in self.trained_grads():
            g.copy_(vec[a:b].view(g.shape))

    def dot_params(self, vec: Tensor) -> float:
        """``⟨θ, v⟩`` accumulated in float64 (host sync; curvature steps only).

        Callers subtract two of these to measure a small move of ``θ`` along ``v``. In float32
        the sum of ``P`` terms loses it (its error grows with ``Σ|θᵢvᵢ|``), so the sum is
        accumulated in float64. Each product ``θᵢvᵢ`` is formed in the common dtype of ``θ``
        and ``v``: its rounding, one unit in the last place of a term at most, is of the order
        of the rounding of the float32 parameters' own move, so exact float64 products would
        not measure the move better. The products are formed and summed :data:`_DOT_CHUNK`
        elements at a time: a CPU sum in float64 first copies its input to float64, so a whole
        parameter at once would cost parameter-sized temporaries (12 bytes per element); a
        chunk's are 3 MB at most. On the 670k-parameter MLP of the benchmarks 0.17 ms, against
        0.30 ms for float64 copies of both operands in chunks of 65536.
        """
        chunk = self._DOT_CHUNK
        parts = []
        for p, (a, b) in zip(self.params, self.spans):
            theta = p.detach().reshape(-1)
            for lo in range(0, b - a, chunk):
                hi = min(b - a, lo + chunk)
                parts.append(torch.sum(theta[lo:hi] * vec[a + lo : a + hi], dtype=torch.float64))
        return float(torch.stack(parts).sum()) if parts else 0.0


def aligned_rows(
    rows: tuple[int, ...], numel: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """An uninitialised ``[*rows, numel]`` tensor whose rows start on 64-byte boundaries.

    Rows packed back to back start at multiples of ``numel`` elements: for most sizes two of
    them are misaligned relative to each other, and vectorised BLAS kernels reading both (a
    dot product of two rows, a matrix-vector product with a ``[2, n]`` slice) then take a
    slow path, about 20 times slower on this project's CPU (1.1 ms instead of 0.056 ms for a
    dot product of 670k floats). The row stride is rounded up to 64 bytes, avoiding multiples
    of 4 KiB (rows aliasing in the cache); the padding is a few elements per row.
    """
    if not rows:
        return torch.empty(numel, dtype=dtype, device=device)
    size = torch.empty((), dtype=dtype).element_size()
    unit = max(1, 64 // size)
    stride = -(-numel // unit) * unit
    if (stride * size) % 4096 == 0:
        stride += unit
    return torch.empty(*rows, stride, dtype=dtype, device=device)[..., :numel]


def stack_rows(vectors: list[Tensor]) -> Tensor:
    """``torch.stack`` of flat vectors into :func:`aligned_rows` (copied)."""
    ref = vectors[0]
    out = aligned_rows((len(vectors),), ref.numel(), ref.dtype, ref.device)
    for row, v in zip(out, vectors):
        row.copy_(v)
    return out


def all_finite(v: Tensor) -> Tensor:
    """Device-side flag: every entry of the flat ``v`` is finite (no host sync).

    One min/max reduction (NaN propagates through both) instead of the element-wise passes of
    ``torch.isfinite(v).all()``.
    """
    lo, hi = torch.aminmax(v)
    return torch.isfinite(lo) & torch.isfinite(hi)


def row(rows: Tensor | None, i: int) -> Tensor | None:
    """Row ``i`` of stacked flat vectors (e.g. a ``[2, P]`` pair), or ``None`` without them."""
    return None if rows is None else rows[i]
