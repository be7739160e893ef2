"""Memory held by the graphs that second-derivative products differentiate.

A Hessian-vector product by double backward needs the graph of the gradient (built with
``create_graph=True``), a GGN product the graph of ``Jᵀu``: tensors saved by those backward
passes beyond the ones the forward pass saved. :class:`SavedCounter` counts them as they are
saved, so that cost models declare exactly that transient memory.

Counting runs a Python hook for every tensor the graph saves and a Python unpack hook for every
tensor the products read back (on the 670k-parameter MLP of the benchmarks at batch 32, 0.03-0.1
ms of a 4 ms AdaHessian step). :class:`SavedCounts` therefore counts the graph of each graph
signature (:meth:`~precond.grad_maker.GradientMaker.graph_signature`) once and reuses the count.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from ._cache import BoundedCache

__all__ = ["SavedCounter", "SavedCounts", "gradient_with_saved"]


class SavedCounter:
    """Counts the elements of tensors saved by the graphs built inside the ``with`` block.

    Tensors that are parameters or outputs of the forward pass (their ``grad_fn`` is not newer
    than the loss's) are not counted: they exist without the graph. Storages count once. The
    hook stores a detached alias: the tensor itself would make a saved output hold its own
    ``grad_fn`` (a reference cycle that keeps the graph alive).
    """

    def __init__(self, loss: Tensor) -> None:
        fn = loss.grad_fn
        self._seq = fn._sequence_nr() if fn is not None else -1
        self._seen: set[int] = set()
        self.numel = 0
        #: Elements of the largest storage counted.
        self.largest = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, t: Tensor) -> Tensor:
        fn = t.grad_fn
        if fn is not None and fn._sequence_nr() > self._seq:
            if t.layout is torch.strided:
                ptr = t.untyped_storage().data_ptr()
                n = t.untyped_storage().nbytes() // max(t.element_size(), 1)
            elif t.layout is torch.sparse_coo:  # no storage: its values and indices
                ptr = t._values().untyped_storage().data_ptr()
                n = t._values().numel() + t._indices().numel()
            else:
                return t.detach()
            if ptr not in self._seen:
                self._seen.add(ptr)
                self.numel += n
                self.largest = max(self.largest, n)
        return t.detach()

    @property
    def working_numel(self) -> int:
        """Working set of differentiating the counted graph: two vectors of its largest node."""
        return 2 * self.largest

    def __enter__(self) -> SavedCounter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def _unpack(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class Counted:
    """What a :class:`SavedCounter` found in one graph."""

    numel: int
    working_numel: int


class SavedCounts:
    """:class:`SavedCounter`'s results per graph signature, counted at the first graph of each.

    Graphs built from inputs of the same shapes, by the same modules in the same modes, with the
    same parameters trained, save tensors of the same sizes, unless the model's operations
    depend on the values of its inputs (data-dependent control flow); such a model's graphs are
    counted at the first step of each signature. The counts only size the transient memory of
    cost models; nothing numerical depends on them.

    Args:
        limit: Signatures kept, the most recent (a model called with inputs of ever new shapes
            then counts every graph, as without the cache).
    """

    def __init__(self, limit: int = 16) -> None:
        self._known: BoundedCache[Counted] = BoundedCache(limit)

    @contextmanager
    def counting(self, loss: Tensor, key: Hashable | None) -> Iterator[SavedCounter | Counted]:
        """Count the graphs built inside the block, unless ``key`` was counted before.

        Yields the :class:`SavedCounter` (read it after the block) or the earlier
        :class:`Counted`. ``key=None`` always counts and remembers nothing.
        """
        known = None if key is None else self._known.get(key)
        if known is not None:
            yield known
            return
        with SavedCounter(loss) as counter:
            yield counter
        if key is not None:
            self._known.put(key, Counted(counter.numel, counter.working_numel))

    def clear(self) -> None:
        """Forget every count."""
        self._known.clear()


def gradient_with_saved(
    loss: Tensor,
    params: Sequence[Tensor],
    counts: SavedCounts | None = None,
    key: Hashable | None = None,
) -> tuple[list[Tensor], int]:
    """``∇_θ L`` built with ``create_graph=True``, and the transient memory of its products.

    Args:
        loss: Scalar loss (its forward graph is kept).
        params: Parameters.
        counts: Earlier counts to reuse for ``key`` (see :class:`SavedCounts`); without it
            the graph is always counted.
        key: The graph's signature.

    Returns:
        The gradients (zeros for unused parameters) and the elements of the tensors the
        gradient's graph saved beyond the forward pass's plus the working set of a product's
        second pass (see :class:`SavedCounter`).
    """
    if counts is None:
        counts, key = SavedCounts(), None
    with counts.counting(loss, key) as counter:
        grads = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
    out = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return out, counter.numel + counter.working_numel
